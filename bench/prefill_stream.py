"""Prefill under demand paging on a CPU device, a wave at a time against streamed waves, side by side in one
run, and streamed with the next layer's experts copied behind each chunk's last wave (issue 27;
``offload_bench/prefill_stream.py`` says how).

    python bench/prefill_stream.py [--smoke] [--layers 8] [--vram-budget 1.5GB] [--prompt-tokens 512]
        [--prefill-chunk 256] [--repeats 3] [--out bench/results/prefill_stream.json]
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

from offload_bench import prefill_stream  # noqa: E402
from offload_bench.machine import versions  # noqa: E402
from offload_bench.results import write_json  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny widths, two layers: checks the script runs")
    p.add_argument(
        "--layers", type=int, default=8, help="MoE layers of the OLMoE shape (the trace's first ones)"
    )
    p.add_argument("--vram-budget", default="1.5GB")
    p.add_argument("--max-context", type=int, default=1024)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--prefill-chunk", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--trace", type=Path, default=ROOT / "data" / "traces" / "olmoe-1b-7b_decode_299.jsonl")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "prefill_stream.json")
    args = p.parse_args()
    import torch

    result = prefill_stream.run(args)
    for name, row in result["modes"].items():
        print(
            f"{name:15s} prefill {row['prefill_tokens_per_s']:.1f} tok/s (best of {args.repeats}), stall "
            f"{row['stall_seconds']:.3f} s, {row['bytes_per_prefill_token'] / 1e6:.2f} MB copied per token"
        )
    print(
        f"against a wave at a time: streamed {result['speedup']:.2f}x (same bytes: {result['same_bytes']}), "
        f"with the next layer {result['speedup_next_layer']:.2f}x"
    )
    write_json(
        dict(
            command=" ".join(["python", "bench/prefill_stream.py", *sys.argv[1:]]),
            date=datetime.datetime.now().isoformat(timespec="seconds"),
            machine=dict(
                cpu=platform.processor() or platform.machine(),
                threads=torch.get_num_threads(),
                **versions(),
            ),
            vram_budget=args.vram_budget,
            **result,
        ),
        args.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
