"""``offload-bench``: benchmarks and studies, one subcommand each.

    offload-bench sweep ...     cache policies on routing traces (no GPU, no model: cache_policies.sweep)
    offload-bench e2e ...       end-to-end decode, demand paging vs prefetch vs accelerate (bench/e2e.py)

Each subcommand registers its arguments and a handler; a handler's module is imported only when its
subcommand runs, so ``offload-bench sweep`` never imports torch. To add one: write ``_add_NAME(subparsers)``
that builds the subparser and sets ``handler``, and call it from :func:`build_parser`.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import NoReturn

# The end-to-end benchmark is a script of the source tree (bench/ is not an installed package).
E2E_SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "e2e.py"


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (``prog: error: ...``) and exit code 2, like every error of the CLI."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_sweep(subparsers: argparse._SubParsersAction[_Parser]) -> None:
    from cache_policies import sweep  # numpy + stdlib: cheap, and no torch

    parser = subparsers.add_parser(
        "sweep",
        help="hit rates of cache policies on routing traces, Belady beside them",
        description=sweep.__doc__.split("\n\n")[0] if sweep.__doc__ else None,
    )
    sweep.add_arguments(parser)
    parser.set_defaults(handler=lambda args: sweep.run(args, parser.prog))


def _load_e2e() -> ModuleType:
    """bench/e2e.py as a module; it imports only the standard library until a run starts."""
    spec = importlib.util.spec_from_file_location("offload_bench_e2e", E2E_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _add_e2e(subparsers: argparse._SubParsersAction[_Parser]) -> None:
    summary = "end-to-end decode of offloaded models of real shapes: demand LRU, prefetch, accelerate"
    if not E2E_SCRIPT.is_file():
        parser = subparsers.add_parser("e2e", help=summary + " (needs a source checkout)")
        parser.set_defaults(
            handler=lambda args: parser.exit(
                2, f"{parser.prog}: error: {E2E_SCRIPT} not found: run it from a source checkout\n"
            )
        )
        return
    e2e = _load_e2e()
    parser = subparsers.add_parser(
        "e2e",
        help=summary,
        description=e2e.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e2e.add_arguments(parser)
    parser.set_defaults(handler=lambda args: e2e.run(args, parser.prog, args.argv[1:]))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="offload-bench", description="Benchmarks and studies for moe-offload.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    _add_sweep(subparsers)
    _add_e2e(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(given)
    args.argv = given  # the command as given, for results that record it
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
