"""Record a routing trace from the reference model on its held-out text, with the runtime's own recorder.

Teacher-forced token-by-token decoding (offload_bench/prediction.py's loop) over held-out windows spread over
the held-out files: every step is one decode token, as in the shared OLMoE decode trace, so the trace replays
what the cache sees when the model generates. The routing does not depend on the budget or the policy
(invariant *exact-results*); all experts are resident here.

    python bench/reference_trace.py      # 8 windows x 256 tokens: data/traces/reference-moe_heldout_decode_2048.npz
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

# transformers probes for the hub "kernels" package with `import kernels`, which would find bench/kernels.py
# while this script's folder is on sys.path: keep it off.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
TRACES = Path(__file__).resolve().parents[1] / "data" / "traces"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=8, help="held-out windows of 256 tokens (default 8)")
    ap.add_argument("--out", type=Path, help="default: data/traces/reference-moe_heldout_decode_<tokens>.npz")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    import offload
    from offload_bench.prediction import decode_teacher_forced
    from offload_bench.reference_text import REFERENCE_DIR, held_out, training_record

    tokenizer = AutoTokenizer.from_pretrained(REFERENCE_DIR)
    text = held_out(tokenizer)
    model = offload.from_pretrained(
        REFERENCE_DIR, vram_budget="1GB", device="cpu", max_context=256, record_trace=True, progress=False
    )
    seq = model.config.max_position_embeddings
    windows = [w[:seq] for w in text.windows(seq)]
    windows = windows[:: max(1, len(windows) // args.windows)][: args.windows]
    tokens = decode_teacher_forced(model, windows)
    python = training_record()["corpus"]["python"]
    trace = dataclasses.replace(
        offload.routing_trace(model),
        model="reference-moe (data/models/reference-moe: Qwen3-MoE, 6 MoE layers x 16 experts, top-4)",
        source=f"recorded by moe-offload (bench/reference_trace.py --windows {args.windows}): teacher-forced "
        f"decoding of {len(windows)} windows of {seq} tokens spread over the model's held-out files (Python "
        f"{python} standard library, contents sha256 {text.sha256[:16]}...), the context restarting at each "
        "window, bf16 on the CPU",
    )
    out = args.out or TRACES / f"reference-moe_heldout_decode_{tokens}.npz"
    trace.save(out)
    print(f"wrote {out}: {trace.num_steps} steps, {trace.num_layers} layers, top-{trace.top_k}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
