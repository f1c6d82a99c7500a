"""Stage ``kernels``: the Triton kernels in bf16 at the Mixtral-8x7B, Qwen3-30B-A3B, OLMoE and DeepSeek-V2-Lite
expert shapes, 1, 16, 256 and 4096 tokens: correct against the torch reference (within the bf16 tolerance of
the kernel tests), and timed against a per-expert torch loop and ``torch.nn.functional.grouped_mm``; GB/s
against the device bandwidth measured in the same process at 1 token, TFLOP/s at 4096.

Compressed experts (int8, int4, mxfp4, fp8) at the Qwen3-30B-A3B shape, 1 and 256 tokens: the Triton kernels
that dequantize in registers against the dequantize-then-matmul torch loop (correctness within the same bf16
tolerance, and time), with bytes per expert beside them."""

from __future__ import annotations

import math

import torch

from offload_bench.gpu_check.part import Part
from offload_bench.kernel_timing import MODELS, SMOKE_MODELS, bench_model, measure_peak, targets

TOKENS = (1, 256, 4096, 16)  # the target rows first: a run cut short by its cap keeps them
SMOKE_TOKENS = (1, 16)
IMPLS = ["triton", "torch-loop", "grouped_mm"]
COMPRESSED = ("int4", "mxfp4", "fp8", "int8")  # int4 first: the format the offloading targets are about
COMPRESSED_MODEL = "qwen3-30b-a3b"
COMPRESSED_TOKENS = (1, 256)
COMPRESSED_IMPLS = ["triton", "torch-loop"]  # grouped_mm reads float experts only
SECONDS_PER_CELL = 8.0  # a cell is not started with less than this left (compiles included)


def cells(smoke: bool) -> list[tuple[str, str, int]]:
    """(format, model, tokens) in the order they run: the float targets' token counts, then the compressed
    formats, then the rest of the float rows, so a run cut short by its cap keeps what matters most."""
    models = SMOKE_MODELS if smoke else MODELS
    tokens = SMOKE_TOKENS if smoke else TOKENS
    model = next(iter(SMOKE_MODELS)) if smoke else COMPRESSED_MODEL
    floats = [("float", name, t) for t in tokens for name in models]
    split = len(models) * (1 if smoke else 2)
    # the smoke run (interpreted, under a cap of seconds) has room for one: every format has its own
    # interpreter tests (tests/offload/kernels/test_compressed_kernels.py)
    compressed = (
        [(fmt, model, t) for fmt in COMPRESSED[:1] for t in COMPRESSED_TOKENS[:1]]
        if smoke
        else [(fmt, model, t) for fmt in COMPRESSED for t in COMPRESSED_TOKENS]
    )
    return floats[:split] + compressed + floats[split:]


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
    for fmt, name, tokens in cells(part.smoke):
        if seconds - part.elapsed() < SECONDS_PER_CELL:
            part.add("skipped", dict(model=name, format=fmt, tokens=tokens, reason="the stage's time cap"))
            continue
        shape = models[name]
        routings = 2 if part.smoke else max(2, min(16, math.ceil(shape.experts / shape.top_k)))
        impls = IMPLS if fmt == "float" else COMPRESSED_IMPLS
        for row in bench_model(name, shape, [tokens], dtype, device, peak, impls, routings, fmt):
            part.add("rows", row)
        judge(part)  # after every cell: a stage stopped at its cap keeps its verdicts


def judge(part: Part) -> None:
    """Every target the rows so far decide (judged again, in place, as rows come in)."""
    rows = part.data["rows"]
    for compressed in (False, True):
        ours = [r for r in rows if r["impl"] == "triton" and (r.get("format") in COMPRESSED) == compressed]
        wrong = [r for r in ours if "error" in r or r.get("within_tolerance") is False]
        part.target(
            "Triton bf16 output within tolerance of the torch reference"
            + (" (compressed experts: the dequantize-then-matmul oracle)" if compressed else ""),
            f"{sum(1 for r in ours if r.get('within_tolerance'))} of {len(ours)} cells",
            None if part.smoke or not ours else not wrong,
            invariant=True,
            wrong=[
                (r["model"], r.get("format"), r["tokens"], r.get("max_abs_err_vs_torch", r.get("error")))
                for r in wrong
            ],
        )
    for t in targets(rows):
        part.target(
            f"{t['target']} ({t['model']}, {t['tokens']} tokens)",
            t["value"],
            None if part.smoke else t["met"],
            compared=t.get("compared"),
        )
