"""Compile the Triton MoE kernels for a GPU that is not here (triton ships ptxas): what CI can check.

The launcher of :class:`~offload.kernels.triton_moe.TritonMoeKernel` is swapped for a recorder, so the
exact launches a layer call would make (same heuristics, a given SM count and shared memory) are
specialized the way triton's JIT would (its own ``native_specialize_impl``: types, 16-byte alignment,
ints equal to 1) and compiled to cubin for the target architecture. Each launch is then checked:

- it compiles, and its arguments are exactly the kernel's parameters (the interpreter ignores extra ones);
- it fits the target's shared memory;
- the prefill GEMM uses tensor cores (``mma``/``wgmma``) for 16-bit dtypes, and weight loads are vectorized.

It says nothing about speed or runtime correctness: ``tests/test_kernels.py -m gpu`` and ``bench/kernels.py``
on a GPU do. Run ``python -m offload.kernels.triton.aot --help`` (``TRITON_INTERPRET`` must be unset).
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import torch

from offload.kernels.activation import ExpertActivation
from offload.kernels.routing import RoutedTokens
from offload.kernels.triton.launch import TritonMoeKernel
from offload.kernels.triton.launch_plan import DeviceInfo, TritonMoeOptions
from offload.memory import formats
from offload.memory.layout import ExpertLayout
from offload.memory.slot_pool import SlotPool

# Targets: SM count and opt-in shared memory per block of one card of each architecture.
TARGETS: dict[str, tuple[int, DeviceInfo]] = {
    "a100": (80, DeviceInfo(sm_count=108, smem_bytes=163 * 1024)),
    "rtx3090": (86, DeviceInfo(sm_count=82, smem_bytes=99 * 1024)),
    "rtx4090": (89, DeviceInfo(sm_count=128, smem_bytes=99 * 1024)),
    "h100": (90, DeviceInfo(sm_count=132, smem_bytes=227 * 1024)),
}

_LAUNCH_OPTIONS = ("num_warps", "num_stages")
_PTX_OPS = re.compile(r"\b(wgmma\.mma_async|mma\.sync|cp\.async\.cg|cp\.async\.ca|ld\.global(?:\.\w+)*)")


@dataclass(frozen=True)
class CompiledLaunch:
    kernel: str
    target: str
    grid: tuple[int, ...]
    constexprs: str  # the ones that pick a variant: STAGE, SPLIT, tiles
    num_warps: int
    num_stages: int
    shared_bytes: int
    smem_limit: int
    tensor_core_ops: int  # mma.sync / wgmma.mma_async instructions in the PTX
    vector_loads: int  # ld.global.v2/v4 and cp.async instructions
    scalar_loads: int


def record_launches(
    layout: ExpertLayout,
    tokens: int,
    top_k: int,
    num_experts: int,
    kind: str,
    device_info: DeviceInfo,
    options: TritonMoeOptions | None = None,
    seed: int = 0,
) -> list[tuple[Any, tuple[int, ...], dict[str, Any]]]:
    """The (kernel, grid, kwargs) launches of one layer call with every expert resident, not run.

    Tensors are CPU ``torch.empty`` (pages never touched), so addresses and alignment are real.
    """
    launches: list[tuple[Any, tuple[int, ...], dict[str, Any]]] = []
    pool = SlotPool(layout, num_experts, torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    index = torch.rand(tokens, num_experts, generator=g).topk(top_k, dim=-1).indices
    weights = torch.full((tokens, top_k), 1.0 / top_k, dtype=layout.dtype)
    hidden = torch.empty((tokens, layout.hidden_size), dtype=layout.dtype)
    routed = RoutedTokens.build(hidden, index, weights, num_experts)
    out = torch.empty((tokens * top_k, layout.hidden_size), dtype=layout.dtype)
    activation = ExpertActivation(kind, layout.has_gate, lambda x: x, alpha=1.702, limit=7.0)
    kernel = TritonMoeKernel(options, device_info, launch=lambda k, grid, kw: launches.append((k, grid, kw)))
    kernel(routed, routed.experts, routed.experts, pool, activation, out)
    return launches


def compile_launch(kernel: Any, grid: tuple[int, ...], kwargs: dict[str, Any], target: str) -> CompiledLaunch:
    """Specialize like the JIT would, compile for ``target``'s architecture, and inspect the PTX."""
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    if not hasattr(kernel, "params"):
        raise RuntimeError("the kernels were built for Triton's interpreter: unset TRITON_INTERPRET")
    names = {p.name for p in kernel.params}
    given = set(kwargs) - set(_LAUNCH_OPTIONS)
    if given != names:
        raise TypeError(
            f"{kernel.__name__}: missing {sorted(names - given)}, unexpected {sorted(given - names)}"
        )
    signature: dict[str, str] = {}
    constexprs: dict[str, Any] = {}
    attrs: dict[tuple[int, ...], Any] = {}
    for i, p in enumerate(kernel.params):
        value = kwargs[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", value
            continue
        ty, spec = native_specialize_impl(
            BaseBackend, value, False, not p.do_not_specialize, not p.do_not_specialize_on_alignment
        )
        if ty == "constexpr":  # an int equal to 1
            signature[p.name], constexprs[p.name] = "constexpr", spec
            continue
        signature[p.name] = ty
        if isinstance(spec, str):
            attrs[(i,)] = BaseBackend.parse_attr(spec)
    arch, info = TARGETS[target]
    options = {k: kwargs[k] for k in _LAUNCH_OPTIONS if k in kwargs}
    compiled = triton.compile(
        ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32), options=options
    )
    ops = Counter(_PTX_OPS.findall(compiled.asm["ptx"]))
    loads = {op: n for op, n in ops.items() if op.startswith("ld.global")}
    vector = sum(n for op, n in loads.items() if ".v2" in op or ".v4" in op)
    picks = ("FORMAT", "GROUP", "STAGE", "SPLIT", "BLOCK_M", "BLOCK_N", "BLOCK_K")
    variant = {k: kwargs[k] for k in picks if k in kwargs and (k != "GROUP" or kwargs[k])}
    return CompiledLaunch(
        kernel=kernel.__name__,
        target=target,
        grid=tuple(grid),
        constexprs=" ".join(f"{k}={v}" for k, v in variant.items()),
        num_warps=compiled.metadata.num_warps,
        num_stages=compiled.metadata.num_stages,
        shared_bytes=compiled.metadata.shared,
        smem_limit=info.smem_bytes,
        tensor_core_ops=ops["wgmma.mma_async"] + ops["mma.sync"],
        vector_loads=vector + ops["cp.async.cg"] + ops["cp.async.ca"],
        scalar_loads=sum(loads.values()) - vector,
    )


def check(launch: CompiledLaunch, dtype: torch.dtype) -> list[str]:
    """Problems with one compiled launch (empty: fine)."""
    problems = []
    if launch.shared_bytes > launch.smem_limit:
        problems.append(
            f"needs {launch.shared_bytes} B of shared memory, {launch.target} has {launch.smem_limit}"
        )
    if launch.kernel == "pairs_gemm" and dtype != torch.float32 and launch.tensor_core_ops == 0:
        problems.append("no tensor-core instruction in a 16-bit tl.dot kernel")
    if launch.kernel != "splitk_reduce" and launch.vector_loads == 0:
        problems.append("no vectorized weight loads")
    return problems


# Expert shapes (hidden, intermediate, experts, top-k) of the models in bench/kernels.py.
MODELS = {
    "mixtral-8x7b": (4096, 14336, 8, 2),
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "olmoe-1b-7b": (2048, 1024, 64, 8),
    "deepseek-v2-lite": (2048, 1408, 64, 6),
}


# Every activation and layout variant the runtime can meet: (kind, has_gate, has_bias).
VARIANTS = [(act, gate, bias) for act in ("silu", "gelu_tanh", "gelu", "relu") for gate in (True, False)
            for bias in (False, True)] + [("gpt_oss", True, True), ("gpt_oss", True, False)]  # fmt: skip
# Token counts at which the dispatch's choices change (decode, split-K, prefill block sizes).
TOKEN_SWEEP = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
_NOT_VARIANT = {"N", "K", "TOP_K", "NUM_EXPERTS", "UP_OFF", "K_PER_SPLIT", "pos_base", "num_blocks", "alpha",
                "limit", "slot_bytes"}  # fmt: skip
# Compressed storage formats with the group loading gives them, each at every model shape at one token
# (decode, split-K where the heuristics split) and 256 (prefill): not the full product with every tile of
# TOKEN_SWEEP, which would double the compile time; the format code sits in the weight loads, apart from
# the tiles. int4's other common group at one shape.
FORMAT_VARIANTS = [("int8", 0), ("int4", 64), ("mxfp4", 32), ("fp8", 128)]
FORMAT_TOKENS = [1, 256]


def layout_of(
    hidden: int, inter: int, has_gate: bool, has_bias: bool, dtype: torch.dtype, fmt: str = "float"
) -> ExpertLayout:
    """The layout a checkpoint loads into, in storage format ``fmt`` with that format's usual group."""
    group = {"int4": formats.DEFAULT_INT4_GROUP, "mxfp4": formats.MXFP4_BLOCK, "fp8": 128}.get(fmt, 0)
    return ExpertLayout(hidden, inter, has_gate, has_bias, dtype, format=fmt, group_size=group)


def variant_launches(
    targets: list[str], dtypes: list[torch.dtype], compressed: bool = True
) -> list[tuple[str, Any, tuple[int, ...], dict[str, Any]]]:
    """One launch per distinct compiled kernel the dispatch can pick: every tile it chooses for the four
    model shapes across :data:`TOKEN_SWEEP`, every activation and layout variant (decode and prefill at
    one shape), and every compressed format at the model shapes (:data:`FORMAT_VARIANTS`). Distinct means
    a different kernel, target, dtype, flag, tile, split > 1, warps or stages; the dimensions only bound
    loops and masks. ``compressed=False`` leaves the formats out. Returns ``(target, kernel, grid, kwargs)``."""
    seen: dict[tuple[Any, ...], tuple[str, Any, tuple[int, ...], dict[str, Any]]] = {}
    for target, dtype in itertools.product(targets, dtypes):
        info = TARGETS[target][1]
        cases = [
            (ExpertLayout(h, i, True, False, dtype), tokens, k, e, "silu")
            for (h, i, e, k), tokens in itertools.product(MODELS.values(), TOKEN_SWEEP)
        ] + [
            (ExpertLayout(2048, 1024, gate, bias, dtype), tokens, 8, 64, act)
            for (act, gate, bias), tokens in itertools.product(VARIANTS, (1, 256))
        ]
        formats_cases = (
            [
                (ExpertLayout(h, i, True, False, dtype, format=fmt, group_size=group), tokens, k, e, "silu")
                for (fmt, group), (h, i, e, k), tokens in itertools.product(
                    FORMAT_VARIANTS, MODELS.values(), FORMAT_TOKENS
                )
            ]
            + [  # int4 in groups of 128; gpt-oss: MXFP4 experts with biases and the clamped GLU
                (
                    ExpertLayout(2048, 768, True, False, dtype, format="int4", group_size=128),
                    tokens,
                    8,
                    128,
                    "silu",
                )
                for tokens in FORMAT_TOKENS
            ]
            + [
                (layout_of(2880, 2880, True, True, dtype, "mxfp4"), tokens, 4, 32, "gpt_oss")
                for tokens in FORMAT_TOKENS
            ]
        )
        for layout, tokens, top_k, experts, act in cases + (formats_cases if compressed else []):
            for kernel, grid, kwargs in record_launches(layout, tokens, top_k, experts, act, info):
                key = (target, str(dtype), kernel.__name__, _flags(kwargs, dims=False))
                seen.setdefault(key, (target, kernel, grid, kwargs))
    return list(seen.values())


def _flags(kwargs: dict[str, Any], dims: bool) -> tuple[tuple[str, Any], ...]:
    """What makes a compiled kernel distinct: its constexprs and launch options (with ``dims``, the sizes
    too; without, only whether K is split)."""
    return tuple(
        sorted(
            (name, value if dims or name != "SPLIT" else value > 1)
            for name, value in kwargs.items()
            if not torch.is_tensor(value) and (dims or name not in _NOT_VARIANT)
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", action="append", choices=sorted(TARGETS), help="default: all")
    parser.add_argument("--model", action="append", choices=sorted(MODELS), help="default: all")
    parser.add_argument("--tokens", type=int, action="append", help="default: 1, 64, 4096")
    parser.add_argument("--dtype", action="append", choices=["bf16", "fp16", "fp32"], help="default: bf16")
    parser.add_argument("--bias", action="store_true", help="experts with biases (gpt-oss style)")
    parser.add_argument(
        "--format",
        default="float",
        choices=formats.FORMATS,
        help="the experts' storage format (default: float)",
    )
    parser.add_argument(
        "--all-variants",
        action="store_true",
        help="every distinct kernel the dispatch can pick (tiles across token counts, every activation and "
        "layout) for the targets and dtypes given, instead of --model/--tokens",
    )
    parser.add_argument(
        "--float-only", action="store_true", help="with --all-variants: leave the compressed formats out"
    )
    parser.add_argument("--shard", default="0/1", help="I/N: compile every N-th variant from the I-th")
    parser.add_argument("--json", action="store_true", help="one JSON object per launch")
    args = parser.parse_args(argv)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    targets = args.target or sorted(TARGETS)
    chosen_dtypes = [dtypes[d] for d in args.dtype or ["bf16"]]
    if args.all_variants:
        index, count = (int(x) for x in args.shard.split("/"))
        todo = variant_launches(targets, chosen_dtypes, compressed=not args.float_only)[index::count]
        print(f"{len(todo)} distinct launches in shard {args.shard}")
        failures = sum(_report(t, k, g, kw, "variants", 0, args.json) for t, k, g, kw in todo)
        return 1 if failures else 0
    failures = 0
    seen: set[tuple[Any, ...]] = set()
    for target, dtype, model in itertools.product(targets, chosen_dtypes, args.model or sorted(MODELS)):
        hidden, inter, experts, top_k = MODELS[model]
        layout = layout_of(hidden, inter, True, args.bias, dtype, args.format)
        for tokens in args.tokens or [1, 64, 4096]:
            for kernel, grid, kwargs in record_launches(
                layout, tokens, top_k, experts, "silu", TARGETS[target][1]
            ):
                key = (target, str(dtype), model, kernel.__name__, _flags(kwargs, dims=True))
                if key in seen:
                    continue
                seen.add(key)
                failures += _report(target, kernel, grid, kwargs, model, tokens, args.json)
    return 1 if failures else 0


def _report(
    target: str,
    kernel: Any,
    grid: tuple[int, ...],
    kwargs: dict[str, Any],
    model: str,
    tokens: int,
    as_json: bool,
) -> bool:
    """Compile one launch, check it, print a line (or a JSON object); True when it has a problem."""
    launch = compile_launch(kernel, grid, kwargs, target)
    dtype = kwargs["bias_ptr"].dtype  # a field of the pool in every kernel: the experts' dtype
    problems = check(launch, dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    if as_json:
        print(
            json.dumps(dict(asdict(launch), dtype=dtype_name, model=model, tokens=tokens, problems=problems))
        )
        return bool(problems)
    print(
        f"{target:8} {dtype_name:8} {model:17} T={tokens:<5} {launch.kernel:13} "
        f"{launch.constexprs:45} warps={launch.num_warps} stages={launch.num_stages} "
        f"smem={launch.shared_bytes:>6} tc={launch.tensor_core_ops:<3} vec={launch.vector_loads:<3} "
        f"scalar={launch.scalar_loads:<3} {'; '.join(problems) or 'ok'}"
    )
    return bool(problems)


if __name__ == "__main__":
    sys.exit(main())
