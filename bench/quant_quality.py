"""Quantization quality on the reference model: held-out bits per byte with its experts at full precision,
int8 and int4, through the runtime (``quantize=`` of ``offload.from_pretrained``), on the CPU.

Every variant computes in fp32 so that only the experts' storage differs: "float" is the checkpoint's bf16
experts widened to fp32 (what the model's README scores as 1.8240), int8 and int4 are those bf16 experts
quantized while loading. A bf16-compute row shows what the compute dtype alone costs. Plain transformers'
score of the same checkpoint stands beside them as the check that the runtime changes nothing at full
precision. All slots hold all experts: the budget never changes results (invariant *exact-results*).

    python bench/quant_quality.py                  # every held-out window (573), about 15 min on 2 cores
    python bench/quant_quality.py --windows 20     # a quick look
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

# transformers probes for the hub "kernels" package with `import kernels`, which would find bench/kernels.py
# while this script's folder is on sys.path: keep it off.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
RESULTS = Path(__file__).resolve().parent / "results" / "quant_quality.json"

# (name, compute dtype, quantize, group): int4's group is the input columns sharing one scale and zero.
VARIANTS = (
    ("float", "fp32", None, None),
    ("int8", "fp32", "int8", None),
    ("int4-g128", "fp32", "int4", 128),
    ("int4-g64", "fp32", "int4", 64),
    ("int4-g32", "fp32", "int4", 32),
    ("float-bf16-compute", "bf16", None, None),
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, help="score only the first N held-out windows (default: all)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="JSON to write ('-' for stdout)")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import offload
    from offload_bench.machine import versions
    from offload_bench.reference_text import REFERENCE_DIR, bits_per_byte, held_out

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(REFERENCE_DIR)
    text = held_out(tokenizer)
    seq = int(json.loads((REFERENCE_DIR / "config.json").read_text())["max_position_embeddings"])
    windows = text.windows(seq)[: args.windows]
    rows = []
    start = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(REFERENCE_DIR, dtype=torch.float32)
    rows.append({"variant": "transformers-fp32", **bits_per_byte(hf, windows, text.nbytes)})
    del hf
    print(rows[-1], flush=True)
    for name, dtype, quantize, group in VARIANTS:
        options = {} if group is None else {"quantize_group": group}
        model = offload.from_pretrained(
            REFERENCE_DIR,
            vram_budget="1GB",
            device="cpu",
            dtype=dtype,
            max_context=seq,
            quantize=quantize,
            progress=False,
            **options,
        )
        stats = offload.stats(model)
        assert stats.slots == stats.total_experts
        row = {
            "variant": name,
            "compute_dtype": dtype,
            "expert_format": stats.expert_format,
            "expert_bytes": stats.expert_bytes,
            "quantize_group": group,
        }
        rows.append({**row, **bits_per_byte(model, windows, text.nbytes)})
        offload.close(model)
        print(rows[-1], flush=True)
    base = next(r["bits_per_byte"] for r in rows if r["variant"] == "float")
    for row in rows:
        row["delta_vs_float"] = row["bits_per_byte"] - base
    payload = {
        "benchmark": "quant_quality",
        "command": "python bench/quant_quality.py" + (f" --windows {args.windows}" if args.windows else ""),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "versions": versions(),
        "model": str(REFERENCE_DIR.relative_to(REFERENCE_DIR.parents[2])),
        "held_out": {
            "files": len(text.files),
            "windows": len(windows),
            "window_tokens": seq + 1,
            "contents_sha256": text.sha256,
        },
        "wall_seconds": time.perf_counter() - start,
        "results": rows,
    }
    out = json.dumps(payload, indent=2) + "\n"
    if str(args.out) == "-":
        sys.stdout.write(out)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
