"""The int4pack copy's cost at load: converting one expert to torch's int4pack CPU layout with the runtime's
uint8 ops and through torch's own converter, side by side, per expert shape, format and thread count, and the
seconds that comes to for each model's every expert.

    python bench/int4pack_conversion.py [--smoke] [--shapes S,..] [--repeats 3]
        [--out bench/results/int4pack_conversion.json]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from offload_bench import host_experts as hx  # noqa: E402
from offload_bench.results import write_json  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="a tiny shape only: checks the script runs")
    p.add_argument("--shapes", default=",".join(hx.EXPERT_SHAPES), help="comma-separated expert shapes")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "int4pack_conversion.json")
    args = p.parse_args()
    import torch

    shapes = (
        hx.SMOKE_SHAPES if args.smoke else {name: hx.EXPERT_SHAPES[name] for name in args.shapes.split(",")}
    )
    rows = hx.conversion_table(shapes, args.repeats, hx.thread_counts())
    write_json(
        dict(
            command=" ".join(["python", "bench/int4pack_conversion.py", *sys.argv[1:]]),
            date=datetime.datetime.now().isoformat(timespec="seconds"),
            machine=dict(
                cpu=platform.processor() or platform.machine(),
                capability=torch.backends.cpu.get_cpu_capability(),
                threads=torch.get_num_threads(),
                torch=torch.__version__,
            ),
            conversion=rows,
        ),
        args.out,
    )
    for r in rows:
        model = (
            ""
            if r["model_seconds"] is None
            else (
                f", {r['model_experts']} experts: {r['model_seconds']:.1f} s against {r['torch_converter_model_seconds']:.1f}"
            )
        )
        print(
            f"{r['shape']:14s} {r['format']:5s} x{r['torch_threads']} {r['ms_per_expert']:8.1f} ms/expert, torch's "
            f"converter {r['torch_converter_ms_per_expert']:8.1f} ({r['speedup']:.1f}x){model}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
