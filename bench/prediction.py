"""Expert prediction measured in the runtime on the reference model's held-out text (CPU): recall and
precision of each predictor per layer and overall, and demand misses, bytes moved and stall time at three
budgets with prefetch none, history, lookahead and pre-attention (offload_bench/prediction.py); beside it,
which router input a pre-attention guess should use (offload_bench/pre_attention_inputs.py).

    python bench/prediction.py                          # 8 windows = 2048 decode steps per run, ~10 min on 2 cores
    python bench/prediction.py --windows 1 --study-windows 2 --out -     # a quick look
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

# transformers probes for the hub "kernels" package with `import kernels`, which would find bench/kernels.py
# while this script's folder is on sys.path: keep it off.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
RESULTS = Path(__file__).resolve().parent / "results" / "prediction.json"


def spread(items: list, count: int) -> list:
    """``count`` items evenly spaced over ``items`` (so several held-out files are covered)."""
    return items[:: max(1, len(items) // count)][:count]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=8, help="held-out windows decoded per run (default 8)")
    ap.add_argument(
        "--fractions", default="0.125,0.25,0.5", help="budgets: fractions of all experts in slots"
    )
    ap.add_argument("--modes", default="none,history,lookahead,pre-attention")
    ap.add_argument("--study-windows", type=int, default=32, help="windows for the router-input study")
    ap.add_argument("--out", type=Path, default=RESULTS, help="JSON to write ('-' for stdout)")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from offload_bench import pre_attention_inputs, prediction
    from offload_bench.machine import versions
    from offload_bench.reference_text import REFERENCE_DIR, held_out

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(REFERENCE_DIR)
    text = held_out(tokenizer)
    config = AutoConfig.from_pretrained(REFERENCE_DIR)
    seq = config.max_position_embeddings
    total = config.num_hidden_layers * config.num_experts
    all_windows = [w[:seq] for w in text.windows(seq)]  # decoding: at most the model's 256 positions
    windows = spread(all_windows, args.windows)
    start = time.perf_counter()
    runs = []
    for fraction in (float(f) for f in args.fractions.split(",")):
        slots = max(config.num_experts_per_tok, round(fraction * total))
        for mode in args.modes.split(","):
            row = {"fraction": fraction, **prediction.run(REFERENCE_DIR, windows, slots, mode, seq)}
            runs.append(row)
            score = row["score"] or {}
            print(
                f"{fraction:>6} {mode:>14}: misses {row['demand_misses']:>6} issued {row['prefetch_issued']:>6} "
                f"bytes {row['bytes_moved'] / 1e6:8.1f} MB stall {row['stall_seconds']:6.3f} s "
                f"recall {score.get('recall')} precision {score.get('precision')}",
                flush=True,
            )
    hf = AutoModelForCausalLM.from_pretrained(REFERENCE_DIR, dtype=torch.float32)
    study = pre_attention_inputs.measure(hf, spread(all_windows, args.study_windows))
    print({k: round(v["recall"], 4) for k, v in study["candidates"].items()}, flush=True)
    payload = {
        "benchmark": "prediction",
        "command": "python bench/prediction.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "versions": versions(),
        "model": "data/models/reference-moe",
        "held_out": {
            "windows": len(windows),
            "of_windows": len(all_windows),
            "tokens_per_window": seq,
            "contents_sha256": text.sha256,
        },
        "policy": "lru",
        "cache_scope": "global",
        "copy_engine": "threaded",
        "total_experts": total,
        "wall_seconds": time.perf_counter() - start,
        "runs": runs,
        "pre_attention_inputs": {"windows": args.study_windows, **study},
    }
    from offload_bench.results import write_json

    write_json(payload, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
