"""Quantization quality per expert format, through the runtime (``quantize=`` of ``offload.from_pretrained``),
on the CPU: on the reference model, held-out bits per byte; on it and on each tiny test architecture
(``tests/tiny_models.py``'s ``TINY_ARCHS``, random weights), the relative error of the first MoE layer's
output and of the logits against full precision, and greedy agreement (``offload_bench/quant_error.py``).

Every variant computes in fp32 so that only the experts' storage differs: "float" is the checkpoint's
experts widened to fp32 (the reference model's bf16 ones: what its README scores as 1.8240), int8 and int4
are those experts quantized while loading. A bf16-compute row shows what the compute dtype alone costs (its
first MoE layer's input differs too). Plain transformers' score of the same checkpoint stands beside them as
the check that the runtime changes nothing at full precision. All slots hold all experts: the budget never
changes results (invariant *exact-results*). The tiny models read random tokens.

    python bench/quant_quality.py                  # every held-out window (573), about 30 min on 2 busy cores
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
from typing import Any

# transformers probes for the hub "kernels" package with `import kernels`, which would find bench/kernels.py
# while this script's folder is on sys.path: keep it off. The root is on it for tests/tiny_models.py.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT), *(p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench")]
RESULTS = ROOT / "bench" / "results" / "quant_quality.json"

# (name, compute dtype, quantize, group): int4's group is the input columns sharing one scale and zero.
VARIANTS = (
    ("float", "fp32", None, None),
    ("int8", "fp32", "int8", None),
    ("int4-g128", "fp32", "int4", 128),
    ("int4-g64", "fp32", "int4", 64),
    ("int4-g32", "fp32", "int4", 32),
    ("float-bf16-compute", "bf16", None, None),
)
TINY_VARIANTS = ("int8", "int4-g128", "int4-g64")
TINY_WINDOWS, TINY_TOKENS = 16, 64  # random token windows per tiny model, tokens each


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, help="score only the first N held-out windows (default: all)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="JSON to write ('-' for stdout)")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    rows += _compared(REFERENCE_DIR, [v[0] for v in VARIANTS], windows, seq, text.nbytes)
    tiny = {arch: _tiny_rows(arch) for arch in _tiny_archs()}
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
        "tiny_models": {
            "inputs": f"{TINY_WINDOWS} windows of {TINY_TOKENS} random tokens (seed 0) per model",
            "results": tiny,
        },
    }
    from offload_bench.results import write_json

    write_json(payload, args.out)
    return 0


def _compared(
    path: Path, names: list[str], inputs: list[Any], max_context: int, nbytes: Any = None
) -> list[dict[str, Any]]:
    """Offloaded models of ``path`` on the CPU, every expert in a slot, in VARIANTS' formats ``names`` (the
    first the reference), scored together on ``inputs``: one row each."""
    import offload
    from offload_bench.quant_error import compare

    models, rows = {}, []
    try:
        for name in names:
            dtype, quantize, group = next(v[1:] for v in VARIANTS if v[0] == name)
            models[name] = offload.from_pretrained(
                path,
                vram_budget="1GB",
                device="cpu",
                dtype=dtype,
                max_context=max_context,
                quantize=quantize,
                progress=False,
                **({} if group is None else {"quantize_group": group}),
            )
            stats = offload.stats(models[name])
            assert stats.slots == stats.total_experts
            rows.append(
                {
                    "variant": name,
                    "compute_dtype": dtype,
                    "expert_format": stats.expert_format,
                    "expert_bytes": stats.expert_bytes,
                    "quantize_group": group,
                }
            )
        reference, *others = names
        scores = compare(models[reference], {n: models[n] for n in others}, inputs, nbytes)
        scores[reference] = scores.pop("reference")
    finally:
        for model in models.values():
            offload.close(model)
    return [{**row, **scores[row["variant"]]} for row in rows]


def _tiny_archs() -> list[str]:
    from tests.tiny_models import TINY_ARCHS

    return list(TINY_ARCHS)


def _tiny_rows(arch: str) -> list[dict[str, Any]]:
    """Float against each of TINY_VARIANTS on one tiny architecture, saved to a temp folder (fp32 weights)."""
    import tempfile

    import torch

    from tests.tiny_models import TINY_ARCHS, save_tiny

    config = TINY_ARCHS[arch]()
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randint(3, config.vocab_size, (TINY_WINDOWS, TINY_TOKENS + 1), generator=generator)
    with tempfile.TemporaryDirectory() as folder:
        path = save_tiny(config, Path(folder) / arch)
        rows = _compared(path, ["float", *TINY_VARIANTS], list(inputs), TINY_TOKENS)
    print(arch, rows, flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())
