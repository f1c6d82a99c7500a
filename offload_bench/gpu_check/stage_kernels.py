"""Stage ``kernels``: the Triton kernels in bf16 at the Mixtral-8x7B, Qwen3-30B-A3B, OLMoE and DeepSeek-V2-Lite
expert shapes, 1, 16, 256 and 4096 tokens: correct against the torch reference (within the bf16 tolerance of
the kernel tests), and timed against a per-expert torch loop and ``torch.nn.functional.grouped_mm``; GB/s
against the device bandwidth measured in the same process at 1 token, TFLOP/s at 4096."""

from __future__ import annotations

import math

import torch

from offload_bench.gpu_check.part import Part
from offload_bench.kernel_timing import MODELS, SMOKE_MODELS, bench_model, measure_peak, targets

TOKENS = (1, 256, 4096, 16)  # the target rows first: a run cut short by its cap keeps them
SMOKE_TOKENS = (1, 16)
IMPLS = ["triton", "torch-loop", "grouped_mm"]
SECONDS_PER_CELL = 8.0  # a cell is not started with less than this left (compiles included)


def run(part: Part, seconds: float) -> None:
    cuda = torch.cuda.is_available() and not part.smoke
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32  # the interpreter's bf16 tl.dot is wrong
    models = MODELS if cuda else SMOKE_MODELS
    peak, how = measure_peak(device)
    part.set(
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        peak_bytes_per_s=peak,
        peak_measured_with=how,
        impls=IMPLS,
        rows=[],
        skipped=[],
    )
    for tokens in SMOKE_TOKENS if part.smoke else TOKENS:
        for name, shape in models.items():
            if seconds - part.elapsed() < SECONDS_PER_CELL:
                part.add("skipped", dict(model=name, tokens=tokens, reason="the stage's time cap"))
                continue
            routings = 2 if part.smoke else max(2, min(16, math.ceil(shape.experts / shape.top_k)))
            for row in bench_model(name, shape, [tokens], dtype, device, peak, IMPLS, routings):
                part.add("rows", row)
    rows = part.data["rows"]
    wrong = [r for r in rows if r["impl"] == "triton" and r.get("within_tolerance") is False]
    part.target(
        "Triton bf16 output within tolerance of the torch reference",
        f"{sum(1 for r in rows if r['impl'] == 'triton' and r.get('within_tolerance'))} of "
        f"{sum(1 for r in rows if r['impl'] == 'triton')} cells",
        None if part.smoke else not wrong and any(r["impl"] == "triton" for r in rows),
        wrong=[(r["model"], r["tokens"], r["max_abs_err_vs_torch"]) for r in wrong],
    )
    for t in targets(rows):
        part.target(
            f"{t['target']} ({t['model']}, {t['tokens']} tokens)",
            t["value"],
            None if part.smoke else t["met"],
            compared=t.get("compared"),
        )
