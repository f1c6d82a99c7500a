"""``offload-bench``: benchmarks and studies, one subcommand each.

    offload-bench sweep ...     cache policies on routing traces (no GPU, no model: cache_policies.study.sweep)
    offload-bench e2e ...       end-to-end decode, demand paging vs prefetch vs accelerate (offload_bench.e2e)

Each subcommand registers its arguments and a handler; a handler's module is imported only when its
subcommand runs, so ``offload-bench sweep`` never imports torch. To add one: write ``_add_NAME(subparsers)``
that builds the subparser and sets ``handler``, and call it from :func:`build_parser`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from cache_policies.study.presets import PresetParser


class _Parser(PresetParser):
    """Usage errors as one line (``prog: error: ...``) and exit code 2, like every error of the CLI; a
    subcommand with ``--config`` (sweep) reads its TOML preset."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_sweep(subparsers: argparse._SubParsersAction[_Parser]) -> None:
    from cache_policies.study import sweep  # numpy + stdlib: cheap, and no torch

    parser = subparsers.add_parser(
        "sweep",
        help="hit rates of cache policies on routing traces, Belady beside them",
        description=sweep.__doc__.split("\n\n")[0] if sweep.__doc__ else None,
    )
    sweep.add_arguments(parser)
    parser.set_defaults(handler=lambda args: sweep.run(args, parser.prog))


def _add_e2e(subparsers: argparse._SubParsersAction[_Parser]) -> None:
    from offload_bench import e2e  # imports only the standard library until a run starts

    parser = subparsers.add_parser(
        "e2e",
        help="end-to-end decode of offloaded models of real shapes: demand LRU, prefetch, accelerate",
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
