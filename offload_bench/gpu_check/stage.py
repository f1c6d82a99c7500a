"""One stage of the GPU check in its own process: ``python -m offload_bench.gpu_check.stage NAME --part FILE``.

The driver starts it with a time cap; the stage writes what it measured to ``FILE`` as it goes. Exit codes:
0 done, 1 the stage raised (its module could not even be imported, say: a package the GPU image lacks), 3
the stage ran and found something wrong (``Part.fail``, or an invariant target not met).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from pathlib import Path

STAGES = ("machine", "tests", "budget", "kernels", "e2e", "host")
FAILED = 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m offload_bench.gpu_check.stage")
    parser.add_argument("name", choices=STAGES)
    parser.add_argument("--part", type=Path, required=True, help="JSON file the stage writes as it goes")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU")
    parser.add_argument("--seconds", type=float, default=60.0, help="the stage's time cap")
    parser.add_argument("--tests", action="append", help="tests stage: these files or node ids instead")
    args = parser.parse_args(argv)
    if args.smoke:
        # Triton's interpreter must be on before triton is first imported (torch and transformers import
        # it): see offload.kernels.selection.interpreter_ready.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from offload_bench.gpu_check.part import Part, failures_of

    part = Part(args.part, args.smoke)
    options = {"tests": args.tests} if args.name == "tests" and args.tests else {}
    try:
        # Imported here, inside the try: a stage whose imports fail records why, and the next stage runs.
        module = importlib.import_module(f"offload_bench.gpu_check.stage_{args.name}")
        module.run(part, args.seconds, **options)
    except Exception as exc:  # recorded for the summary; the driver goes on with the next stage
        traceback.print_exc()
        part.set(
            error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:400] if str(exc).strip() else ''}"
        )
        return 1
    return FAILED if failures_of(part.data) else 0


if __name__ == "__main__":
    sys.exit(main())
