"""One model on a CPU device in bf16, int8 and int4 at the same VRAM budget: decode and prefill tokens/s side
by side, against a streaming read of the same machine (issue 26; ``offload_bench/cpu_formats.py`` says how).

    python bench/cpu_formats.py [--smoke] [--layers 8] [--vram-budget 2GB] [--prompt-tokens 256]
        [--decode-tokens 32] [--variants bf16,int8,int4,int4-reference] [--out bench/results/cpu_formats.json]
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

from offload_bench import cpu_formats  # noqa: E402
from offload_bench.machine import versions  # noqa: E402
from offload_bench.results import write_json  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny widths, two layers: checks the script runs")
    p.add_argument(
        "--layers", type=int, default=8, help="MoE layers of the OLMoE shape (the trace's first ones)"
    )
    p.add_argument("--vram-budget", default="2GB", help="the same budget for every variant")
    p.add_argument("--max-context", type=int, default=1024)
    p.add_argument("--prompt-tokens", type=int, default=256, help="the prefill measured")
    p.add_argument("--warmup-tokens", type=int, default=8)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--variants", default=",".join(cpu_formats.VARIANTS))
    p.add_argument("--trace", type=Path, default=ROOT / "data" / "traces" / "olmoe-1b-7b_decode_299.jsonl")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cpu_formats.json")
    args = p.parse_args()
    import torch

    result = cpu_formats.run(args)
    write_json(
        dict(
            command=" ".join(["python", "bench/cpu_formats.py", *sys.argv[1:]]),
            date=datetime.datetime.now().isoformat(timespec="seconds"),
            machine=dict(
                cpu=platform.processor() or platform.machine(),
                capability=torch.backends.cpu.get_cpu_capability(),
                threads=torch.get_num_threads(),
                **versions(),
            ),
            shape="olmoe-1b-7b" if not args.smoke else "olmoe tiny widths",
            vram_budget=args.vram_budget,
            **result,
        ),
        args.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
