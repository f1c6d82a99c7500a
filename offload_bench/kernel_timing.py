"""The kernels benchmark's parts: expert shapes, a full slot pool, routings, bytes and FLOPs per call, timing,
and the measured device peak. ``bench/kernels.py`` runs them and writes the JSON; the GPU check reuses them.

Triton's interpreter must be switched on before triton is first imported when these run on a CPU: the
caller does that (see :func:`offload.kernels.selection.interpreter_ready`).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from offload.kernels import ExpertActivation, RoutedTokens, expert_pairs_torch, select_kernel
from offload.kernels.grouped_mm import expert_pairs_grouped_mm, prepare_grouped_mm
from offload.memory import formats
from offload.memory.layout import ExpertLayout
from offload.memory.slot_pool import SlotPool


@dataclass(frozen=True)
class ModelShape:
    hidden: int  # H
    intermediate: int  # I of one routed expert
    experts: int  # E
    top_k: int  # k
    source: str


# Expert shapes. From each transformers config class's documented defaults where they describe the
# checkpoint; where they do not, from the checkpoint's config.json, cross-checked against the bytes per
# expert in docs (3 * H * I * 2 bytes in bf16).
MODELS: dict[str, ModelShape] = {
    "mixtral-8x7b": ModelShape(
        4096, 14336, 8, 2, "MixtralConfig defaults (documented as mistralai/Mixtral-8x7B-v0.1); 352 MB/expert"
    ),
    "qwen3-30b-a3b": ModelShape(
        2048, 768, 128, 8, "Qwen3MoeConfig defaults (documented as Qwen/Qwen3-30B-A3B-Base); 9.4 MB/expert"
    ),
    "olmoe-1b-7b": ModelShape(
        2048,
        1024,
        64,
        8,
        "allenai/OLMoE-1B-7B-0924 config.json; OlmoeConfig's documented default intermediate_size is 2048, "
        "the checkpoint's is 1024 (12.6 MB/expert)",
    ),
    "deepseek-v2-lite": ModelShape(
        2048,
        1408,
        64,
        6,
        "deepseek-ai/DeepSeek-V2-Lite config.json (routed experts; the 2 shared experts are dense, not "
        "offloaded); DeepseekV2Config's defaults (hidden 4096, moe_intermediate 1407, top-k unset) are not "
        "this checkpoint (17.3 MB/expert)",
    ),
}
SMOKE_MODELS = {"tiny": ModelShape(64, 64, 8, 2, "smoke test shape (I a multiple of 32, for MXFP4)")}
TOKENS = [1, 4, 16, 64, 256, 1024, 4096]
SMOKE_TOKENS = [1, 4, 16]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# The group each storage format is benchmarked with: what loading gives it (fp8: DeepSeek-V3's blocks).
FORMAT_GROUPS = {"float": 0, "int8": 0, "int4": formats.DEFAULT_INT4_GROUP, "mxfp4": formats.MXFP4_BLOCK,
                 "fp8": 128}  # fmt: skip
# |kernel - reference| <= atol + rtol * |reference|, as tests/offload/kernels/test_kernels.py states them
# (the reference dequantizes compressed experts first: the kernels multiply the same rounded weights)
TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def silu_glu() -> ExpertActivation:
    def fn(x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up

    return ExpertActivation("silu", True, fn)


def make_pool(
    shape: ModelShape, dtype: torch.dtype, device: torch.device, seed: int, fmt: str = "float"
) -> SlotPool:
    """Every expert resident in storage format ``fmt``, slot s = expert (E - 1 - s): slot ids differ from
    expert ids. Weights of order ``1/sqrt(fan_in)``, so outputs are of order 1."""
    layout = ExpertLayout(
        shape.hidden, shape.intermediate, True, False, dtype, format=fmt, group_size=FORMAT_GROUPS[fmt]
    )
    pool = SlotPool(layout, shape.experts, device)
    g = torch.Generator(device=device).manual_seed(seed)
    for s in range(shape.experts):  # one expert at a time: no pool-sized fp32 temporary
        for name, rows, cols in layout.matrices:
            for field, value in random_matrix(layout, name, rows, cols, g).items():
                pool.field(field)[s].copy_(value)
    return pool


def random_matrix(
    layout: ExpertLayout, name: str, rows: int, cols: int, g: torch.Generator
) -> dict[str, torch.Tensor]:
    """One expert's random matrix ``[rows, cols]`` as the fields of ``layout.format``: float weights
    quantized for int8/int4; random codes with scales of the right size for the checkpoint formats."""
    device, fmt, group = g.device, layout.format, layout.group_size
    if fmt == "mxfp4":
        # FP4 codes have an RMS of about 2.9: the power of two that brings them to 1/sqrt(cols)
        codes = torch.randint(0, 256, (rows, cols // 2), generator=g, device=device, dtype=torch.uint8)
        exponent = 127 + round(-math.log2(2.9 * cols**0.5))
        scales = torch.full((rows, cols // 32), exponent, dtype=torch.uint8, device=device)
        return {name: codes, f"{name}_scale": scales}
    w = torch.randn(rows, cols, generator=g, device=device)
    if fmt == "fp8":  # codes of RMS 16, well inside e4m3's range, and block scales that undo it
        blocks = (-(-rows // group), -(-cols // group))
        scale = torch.full(blocks, 1.0 / (16 * cols**0.5), device=device)
        return {name: (w * 16).to(torch.float8_e4m3fn), f"{name}_scale": scale}
    w = w / cols**0.5
    if fmt == "float":
        return {name: w.to(layout.dtype)}
    return formats.quantize(w, name, fmt, group, layout.dtype)


def routings(shape: ModelShape, tokens: int, dtype: torch.dtype, device: torch.device, n: int, seed: int):
    """``n`` layer calls' routing. At one token, disjoint expert sets cycling through all experts."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in range(n):
        logits = torch.randn(tokens, shape.experts, generator=g)
        if tokens == 1:  # force experts r*k .. r*k+k-1 (mod E): consecutive calls touch different experts
            chosen = [(r * shape.top_k + j) % shape.experts for j in range(shape.top_k)]
            logits[0, chosen] += 100.0
        weights, index = logits.softmax(-1).topk(shape.top_k, dim=-1)
        hidden = torch.randn(tokens, shape.hidden, generator=g).to(dtype)
        routed = RoutedTokens.build(
            hidden.to(device), index.to(device), weights.to(dtype).to(device), shape.experts
        )
        out.append(routed)
    return out


def moved_bytes(routed: RoutedTokens, layout: ExpertLayout) -> int:
    tokens, k = routed.top_k_index.shape
    e = layout.element_size
    weights = len(routed.experts) * layout.payload_bytes
    activations = tokens * layout.hidden_size * e + tokens * k * layout.hidden_size * e  # x in, pairs out
    workspace = 2 * tokens * k * layout.intermediate_size * e  # h written, then read
    return weights + activations + workspace


def flops(routed: RoutedTokens, layout: ExpertLayout) -> int:
    pairs = routed.top_k_index.numel()
    return 2 * pairs * (layout.gate_up_rows + layout.intermediate_size) * layout.hidden_size


# -- timing -----------------------------------------------------------------------------------------------


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Microseconds per call, host work included."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")) * 1e3
    fn()  # CPU (smoke): one warm-up, then the best of three
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e6


def time_graph(fn: Callable[[], object]) -> float | None:
    """Microseconds per call of GPU time: ``fn`` captured in a CUDA graph, replayed. None if not capturable."""
    import triton.testing

    try:
        # rep=100 ms of unrolled calls in one graph: thousands of nodes at most for the fastest rows
        return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")) * 1e3
    except Exception as exc:  # e.g. an op that syncs with the host cannot be captured
        print(f"    (not capturable in a CUDA graph: {type(exc).__name__}: {str(exc)[:100]})")
        torch.cuda.synchronize()
        return None


def measure_peak(device: torch.device) -> tuple[float, str]:
    """Bytes/s of a large copy on this device: the HBM peak this run compares against."""
    if device.type == "cuda":
        n = 1 << 30  # 2 x 1 GiB, far beyond any L2
        src = torch.empty(n, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        us = time_call(lambda: dst.copy_(src), device)
        del src, dst
        return 2 * n / (us * 1e-6), "device-to-device copy of 1 GiB (read + write), do_bench median"
    n = 1 << 27
    src = torch.ones(n, dtype=torch.uint8)
    dst = torch.empty_like(src)
    us = time_call(lambda: dst.copy_(src), device)
    return 2 * n / (us * 1e-6), "host memory copy of 128 MiB (CPU smoke run: not an HBM peak)"


# -- the run ----------------------------------------------------------------------------------------------


def bench_model(
    name: str,
    shape: ModelShape,
    tokens_list: list[int],
    dtype: torch.dtype,
    device: torch.device,
    peak: float,
    impls: list[str],
    n_routings: int,
    fmt: str = "float",
) -> list[dict]:
    """Rows of every impl at every token count, experts stored in ``fmt`` (compressed experts: grouped_mm
    reads float experts only, and its rows record that error)."""
    pool = make_pool(shape, dtype, device, seed=0, fmt=fmt)
    layout = pool.layout
    activation = silu_glu()
    triton_auto: Any = select_kernel("triton", device)  # a TritonMoeKernel
    triton_kernels = {
        "triton": triton_auto,
        "triton-decode": triton_auto.with_options(path="decode"),
        "triton-prefill": triton_auto.with_options(path="prefill"),
    }
    slot_of = [shape.experts - 1 - e for e in range(shape.experts)]
    rows = []
    for tokens in tokens_list:
        calls = routings(shape, tokens, dtype, device, n_routings, seed=tokens)
        # routing weights in the hidden dtype (as HF's routers return them), so out is in that dtype too
        outs = [torch.zeros((tokens * shape.top_k, shape.hidden), dtype=dtype, device=device) for _ in calls]
        args = [
            (r, r.experts, [slot_of[e] for e in r.experts], pool, activation, o)
            for r, o in zip(calls, outs, strict=True)
        ]
        bytes_per_call = sum(moved_bytes(r, layout) for r in calls) / len(calls)
        flops_per_call = sum(flops(r, layout) for r in calls) / len(calls)

        expert_pairs_torch(*args[0])
        reference = outs[0].clone()
        for impl in impls:
            outs[0].zero_()
            row: dict = dict(
                model=name, tokens=tokens, impl=impl, dtype=str(dtype).removeprefix("torch."),
                format=layout.format_name, expert_bytes=layout.nbytes,
            )  # fmt: skip
            try:
                if impl in triton_kernels:
                    kernel = triton_kernels[impl]
                    launches = [kernel.prepare(*a) for a in args]  # host work done here, once
                    if device.type == "cuda":
                        torch.cuda.synchronize()  # the tables' copies land before a side stream replays
                    plan = kernel.last_plan
                    row["plan"] = None if plan is None else repr(plan)

                    run_all = _each(launches)
                    call_all = _each([functools.partial(kernel, *a) for a in args])
                elif impl == "grouped_mm":  # its tables are copied here, outside any graph capture
                    run_all = _each([prepare_grouped_mm(*a) for a in args])
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    call_all = _each([functools.partial(expert_pairs_grouped_mm, *a) for a in args])
                else:
                    run_all = call_all = _each([functools.partial(expert_pairs_torch, *a) for a in args])
                run_all()
                err = (outs[0].float() - reference.float()).abs().max().item()
                tol = TOLERANCES[dtype]
                correct = torch.allclose(outs[0].float(), reference.float(), atol=tol, rtol=tol)
                call_us = time_call(call_all, device) / len(args)
                kernel_us = time_graph(run_all) if device.type == "cuda" else None
                kernel_us = kernel_us / len(args) if kernel_us is not None else None
            except Exception as exc:  # an impl that cannot run here (e.g. grouped_mm dtype support)
                row.update(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                print(f"  {name:17} {fmt:5} T={tokens:<5} {impl:15} ERROR {row['error']}")
                rows.append(row)
                continue
            us = kernel_us if kernel_us is not None else call_us
            row.update(
                timed="kernel" if kernel_us is not None else "call",  # GB/s and TFLOP/s below use this time
                call_us=round(call_us, 2),
                kernel_us=None if kernel_us is None else round(kernel_us, 2),
                bytes=int(bytes_per_call),
                gbps=round(bytes_per_call / (us * 1e-6) / 1e9, 1),
                pct_peak=round(100 * bytes_per_call / (us * 1e-6) / peak, 1),
                tflops=round(flops_per_call / (us * 1e-6) / 1e12, 2),
                max_abs_err_vs_torch=err,
                reference_max_abs=reference.float().abs().max().item(),
                within_tolerance=correct,
            )
            rows.append(row)
            print(
                f"  {name:17} {fmt:5} T={tokens:<5} {impl:15} kernel {row['kernel_us'] or '-':>9} us  "
                f"call {row['call_us']:>9} us  {row['gbps']:>8} GB/s ({row['pct_peak']:>5}% of peak)  "
                f"{row['tflops']:>7} TFLOP/s  err {err:.2e}"
            )
    del pool
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _each(calls: list[Callable[[], object]]) -> Callable[[], None]:
    def run() -> None:
        for call in calls:
            call()

    return run


def targets(rows: list[dict]) -> list[dict]:
    """Per model: Triton >= 75% of the measured device peak at one token; Triton at least as fast as grouped_mm
    from 256 tokens. Speeds are compared like with like: GPU time of both (CUDA-graph replays) where both have
    it, else host-inclusive call time of both."""
    out = []
    # float experts only: these are the float kernels' targets; compressed rows are reported beside them
    float_rows = [r for r in rows if r.get("format", "float") not in formats.FORMATS[1:]]
    by = {(r["model"], r["tokens"], r["impl"]): r for r in float_rows if "error" not in r}
    for model, tokens, impl in by:
        if impl != "triton":
            continue
        mine = by[model, tokens, impl]
        if tokens == 1:
            out.append(dict(model=model, tokens=1, target=">= 75% of measured HBM peak",
                            value=f"{mine['pct_peak']}%", met=mine["pct_peak"] >= 75))  # fmt: skip
        peer = by.get((model, tokens, "grouped_mm"))
        if tokens >= 256 and peer is not None:
            key = (
                "kernel_us" if mine["kernel_us"] is not None and peer["kernel_us"] is not None else "call_us"
            )
            us, peer_us = mine[key], peer[key]
            out.append(dict(model=model, tokens=tokens, target=">= grouped_mm speed", compared=key,
                            value=f"{peer_us / us:.2f}x grouped_mm", met=us <= peer_us))  # fmt: skip
    return out
