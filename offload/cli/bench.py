"""``offload-bench``: benchmarks and studies, one subcommand each.

    offload-bench sweep ...     cache policies on routing traces (no GPU, no model: cache_policies.sweep)

Each subcommand registers its arguments and a handler; a handler's module is imported only when its
subcommand runs, so ``offload-bench sweep`` never imports torch. To add one: write ``_add_NAME(subparsers)``
that builds the subparser and sets ``handler``, and call it from :func:`build_parser`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn


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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="offload-bench", description="Benchmarks and studies for moe-offload.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    _add_sweep(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
