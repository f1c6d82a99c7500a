"""Fused MoE over the slot pool in Triton: the host side (tables, workspaces, launches).

Pipeline of one wave (``[Route] -> [Plan] -> [Gate-up + act] -> [Down + weight] -> [Combine]``)::

    routed (pairs_by_expert, host spans)        one per layer call, shared by every wave
      -> plan_launch(...)                       pure: path and tiles from the *layer call* (launch_plan.py)
      -> slot_map [E] int32 (+ block table)     the device slot table row, or host lists copied non-blocking
      -> stage 1: h[row] = act(x @ gate.T + b) * (x @ up.T + b)      h: [rows, I] workspace, weights' dtype
      -> stage 2: out[pair] = (h[row] @ down.T + b) * weight[pair]   out: [T*k, H], the caller's buffer
      -> the runtime sums out over k

Combine strategy: per-pair rows, no atomics. Every pair's row is written by exactly one program (or by one
fixed-order split-K reduction), its value depends only on that pair, its expert's weights and the launch
plan, and the plan depends only on the layer call (``T*k``, the per-expert pair counts, the shapes and the
device), so results are bitwise identical whatever the wave partition or slot numbers, and run to run
(invariant *wave-independence*).
The runtime's ``pairs_out.view(T, k, H).sum(1)`` then combines the top-k rows in a fixed order.

The expert -> slot lookup is done on the device through ``slot_map`` (and the pair -> expert lookup through
``top_k_index``), so nothing here waits on the device. For a single-wave call (every decode step) the slot
map is the layer's row of the pool's device slot table, which the copy engine keeps up to date on its own
stream: a decode step copies nothing from the host on the compute stream. A multi-wave call (a prefill that
needs more experts than there are slots) copies its wave's slot map, and every prefill its block table, from
pinned memory.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, NamedTuple

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

from offload.kernels.activation import ExpertActivation
from offload.kernels.routing import RoutedTokens
from offload.kernels.torch_reference import expert_pairs_torch
from offload.kernels.triton.common import ACT_CODES
from offload.kernels.triton.decode import pairs_gemv, splitk_reduce
from offload.kernels.triton.dequant import FORMAT_CODES
from offload.kernels.triton.launch_plan import (
    DeviceInfo,
    GemmTiles,
    GemvTiles,
    LaunchPlan,
    TritonMoeOptions,
    plan_launch,
)
from offload.kernels.triton.prefill import pairs_gemm
from offload.memory.slot_pool import SlotPool

# The bf16 tl.dot trap is the interpreter's (on CPU tensors, or on CUDA ones when debugging with it).
INTERPRETED = isinstance(pairs_gemm, InterpretedFunction)


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    host = torch.tensor(values, dtype=torch.int32)
    if device.type != "cuda":
        return host
    # pinned + non_blocking: the copy is queued on the stream, the host does not wait for the device
    return host.pin_memory().to(device, non_blocking=True)


def _dot_precision() -> str:
    # fp32 models: honour torch's own switch, so triton matches what torch.matmul would do on this GPU
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


Launch = Callable[[Any, tuple[int, ...], dict[str, Any]], None]  # (jit kernel, grid, keyword arguments)


def launch_now(kernel: Any, grid: tuple[int, ...], kwargs: dict[str, Any]) -> None:
    kernel[grid](**kwargs)


class TritonMoeKernel:
    """Callable with the signature of :func:`offload.kernels.expert_pairs_torch`.

    ``device_info`` overrides what the heuristics see (default: the pool's device); ``launch`` replaces
    the launches (default: run them), which :mod:`offload.kernels.triton.aot` uses to compile exactly what
    would run for a GPU that is not there.
    """

    def __init__(
        self,
        options: TritonMoeOptions | None = None,
        device_info: DeviceInfo | None = None,
        launch: Launch = launch_now,
    ) -> None:
        self.options = options or TritonMoeOptions()
        self.device_info = device_info
        self.launch = launch
        self.last_plan: LaunchPlan | None = None  # for tests and the benchmark
        self.calls: Counter[str] = Counter()  # wave calls per path ("decode", "prefill", "torch")

    def with_options(self, **changes: Any) -> TritonMoeKernel:
        return TritonMoeKernel(replace(self.options, **changes), self.device_info, self.launch)

    def _device_info(self, device: torch.device) -> DeviceInfo:
        return self.device_info or DeviceInfo.of(device)

    def prepare(
        self,
        routed: RoutedTokens,
        experts: Sequence[int],
        slots: Sequence[int],
        pool: SlotPool,
        activation: ExpertActivation,
        out: torch.Tensor,
        slot_row: torch.Tensor | None = None,
    ) -> Callable[[], None]:
        """Do one wave's host work now (plan, tables, workspaces) and return a closure that only launches
        the kernels: what a CUDA graph captures, and what the benchmark times as kernel time."""
        if activation.kind not in ACT_CODES:
            return functools.partial(expert_pairs_torch, routed, experts, slots, pool, activation, out)
        launches: list[tuple[Any, tuple[int, ...], dict[str, Any]]] = []
        recorder = TritonMoeKernel(self.options, self.device_info, lambda *launch: launches.append(launch))
        recorder(routed, experts, slots, pool, activation, out, slot_row=slot_row)
        self.last_plan = recorder.last_plan

        def run() -> None:
            with _on(pool.device):
                for kernel, grid, kwargs in launches:
                    self.launch(kernel, grid, kwargs)

        return run

    def plan(self, routed: RoutedTokens, pool: SlotPool) -> LaunchPlan:
        return plan_launch(
            num_pairs=routed.top_k_index.numel(),
            max_pairs_per_expert=routed.max_pairs_per_expert,
            active_experts=len(routed.experts),
            layout=pool.layout,
            device=self._device_info(pool.device),
            opts=self.options,
        )

    def __call__(
        self,
        routed: RoutedTokens,
        experts: Sequence[int],
        slots: Sequence[int],
        pool: SlotPool,
        activation: ExpertActivation,
        out: torch.Tensor,  # [T*k, H], promote_types(hidden.dtype, weights.dtype)
        slot_row: torch.Tensor | None = None,  # [E] int32: the layer's slot table row (single-wave calls)
    ) -> None:
        if activation.kind not in ACT_CODES:
            # "custom": only the model's code knows the math
            expert_pairs_torch(routed, experts, slots, pool, activation, out)
            self.calls["torch"] += 1
            return
        spans = routed.spans
        live = [(e, s) for e, s in zip(experts, slots, strict=True) if e in spans]
        if not live:
            return
        layout = pool.layout
        if activation.has_gate != layout.has_gate:
            raise ValueError(
                f"activation has_gate={activation.has_gate} but the layout has {layout.has_gate}"
            )
        hidden = routed.hidden.contiguous()
        if hidden.dtype != layout.dtype:
            raise ValueError(f"hidden states are {hidden.dtype} but the experts are {layout.dtype}")
        if not out.is_contiguous() or tuple(out.shape) != (routed.top_k_index.numel(), layout.hidden_size):
            raise ValueError(f"out must be a contiguous [T*k, H] tensor, got {tuple(out.shape)}")
        plan = self.plan(routed, pool)
        self.last_plan = plan
        self.calls[plan.path] += 1

        num_experts = routed.num_experts
        pos_base = spans[live[0][0]][0]
        rows = spans[live[-1][0]][1] - pos_base  # positions spanned by this wave's experts
        device = pool.device
        h_dim, i_dim = layout.hidden_size, layout.intermediate_size
        h_ws = torch.empty((rows, i_dim), dtype=layout.dtype, device=device)  # [rows, I]
        bias_up = pool.field("gate_up_bias") if layout.has_bias else h_ws  # (unread)
        bias_down = pool.field("down_bias") if layout.has_bias else h_ws
        gated = layout.has_gate
        fmt = FORMAT_CODES[layout.format]
        stages = (
            _Stage(
                hidden,
                *_weight_fields(pool, "gate_up"),
                bias_up,
                h_ws,
                i_dim,
                h_dim,
                i_dim if gated else 0,
                1,
                gated,
                gated,
                ACT_CODES[activation.kind],
                fmt,
                layout.group_size,
            ),
            # The activation is stage 1's alone: stage 2 always passes the same flags, so one compiled
            # stage-2 kernel serves every activation and gate variant.
            _Stage(
                h_ws,
                *_weight_fields(pool, "down"),
                bias_down,
                out,
                h_dim,
                i_dim,
                0,
                2,
                False,
                False,
                0,
                fmt,
                layout.group_size,
            ),
        )
        args: dict[str, Any] = dict(
            order_ptr=routed.pairs_by_expert,
            weight_ptr=routed.top_k_weights.reshape(-1).contiguous(),
            pos_base=pos_base,
            slot_bytes=pool.data.stride(0),  # the same for every field: each kernel divides by its itemsize
            alpha=float(activation.alpha),
            limit=float(activation.limit),
            TOP_K=routed.top_k,
            HAS_BIAS=layout.has_bias,
        )
        with _on(device):
            if plan.path == "decode":
                args.update(
                    slot_map_ptr=slot_row
                    if slot_row is not None
                    else _to_device(_slot_map(live, num_experts), device),
                    expert_ptr=routed.top_k_index.reshape(-1).contiguous(),
                    NUM_EXPERTS=num_experts,
                )
                for stage, tiles in zip(stages, (plan.gate_up, plan.down), strict=True):
                    assert isinstance(tiles, GemvTiles)
                    _launch_decode(self.launch, stage, tiles, rows, args)
                return
            assert isinstance(plan.gate_up, GemmTiles) and isinstance(plan.down, GemmTiles)
            block_m = plan.gate_up.block_m  # the same for both stages: one block table
            blocks: list[int] = []
            for e, _ in live:
                first, end = spans[e]
                for start in range(first, end, block_m):
                    blocks += [e, start, min(start + block_m, end)]
            if slot_row is not None:
                slot_map, blocks_ptr = slot_row, _to_device(blocks, device)
            else:  # one copy for both tables
                table = _to_device(_slot_map(live, num_experts) + blocks, device)
                slot_map, blocks_ptr = table[:num_experts], table[num_experts:]
            args.update(
                slot_map_ptr=slot_map,
                blocks_ptr=blocks_ptr,
                num_blocks=len(blocks) // 3,
                UPCAST=INTERPRETED and layout.dtype == torch.bfloat16,
                PRECISION=_dot_precision(),
            )
            for stage, tiles in zip(stages, (plan.gate_up, plan.down), strict=True):
                assert isinstance(tiles, GemmTiles)
                _launch_prefill(self.launch, stage, tiles, len(blocks) // 3, args)


def _slot_map(live: list[tuple[int, int]], num_experts: int) -> list[int]:
    """Slot of each expert of this wave, -1 for every other expert (multi-wave calls)."""
    slot_map = [-1] * num_experts
    for e, s in live:
        slot_map[e] = s
    return slot_map


def _weight_fields(pool: SlotPool, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A weight matrix's pool fields as the kernels read them: weights, scales, zero points (a field that
    the format does not have is replaced by the weights, never read)."""
    w = pool.field(name)
    if w.dtype == torch.float8_e4m3fn:
        w = w.view(torch.uint8)  # decoded with integer ops: triton has no fp8e4nv below sm_89
    scale_zero = []
    for field in (f"{name}_scale", f"{name}_zero"):
        try:
            scale_zero.append(pool.field(field))
        except KeyError:
            scale_zero.append(w)
    return w, scale_zero[0], scale_zero[1]


def _on(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Launch on the pool's device, whatever the current one is."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class _Stage(NamedTuple):
    a: torch.Tensor  # stage 1: hidden [T, H]; stage 2: h workspace [rows, I]
    w: torch.Tensor  # pool field: gate_up [S, G*I, H] or down [S, H, I], in the layout's format
    scale: torch.Tensor  # its scales (the weights again where the format has none)
    zero: torch.Tensor  # its zero points (likewise)
    bias: torch.Tensor  # pool field gate_up_bias / down_bias (any pool field when there is no bias)
    c: torch.Tensor  # stage 1: h workspace [rows, I]; stage 2: out [T*k, H]
    n: int  # output columns
    k: int  # reduction length
    up_off: int  # first weight row of "up" (I with a gate in stage 1, else 0)
    stage: int  # 1 or 2
    dual: bool  # two accumulators (gate and up)
    has_gate: bool  # stage 1 only: the activation has a gate
    act: int  # stage 1 only: the activation's code (ACT_CODES)
    format: int  # the weights' storage (FORMAT_CODES); only the weight-reading kernels take it
    group: int  # the format's group or block size

    def constexprs(self) -> dict[str, Any]:
        return dict(
            N=self.n,
            K=self.k,
            UP_OFF=self.up_off,
            STAGE=self.stage,
            DUAL=self.dual,
            HAS_GATE=self.has_gate,
            ACT=self.act,
        )


def _launch_decode(launch: Launch, stage: _Stage, tiles: GemvTiles, rows: int, args: dict[str, Any]) -> None:
    tiles_n = triton.cdiv(stage.n, tiles.block_n)
    common = dict(
        a_ptr=stage.a, w_ptr=stage.w, scale_ptr=stage.scale, zero_ptr=stage.zero, bias_ptr=stage.bias,
        FORMAT=stage.format, GROUP=stage.group, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        K_PER_SPLIT=tiles.k_per_split, SPLIT=tiles.split, num_warps=tiles.num_warps, **stage.constexprs(),
        **args,
    )  # fmt: skip
    if tiles.split == 1:
        launch(pairs_gemv, (rows, tiles_n, 1), dict(common, c_ptr=stage.c))
        return
    # fp32 partial sums [SPLIT, rows, width], added up in a fixed order by splitk_reduce: deterministic
    width = 2 * stage.n if stage.dual else stage.n
    partials = torch.empty((tiles.split, rows, width), dtype=torch.float32, device=stage.c.device)
    launch(pairs_gemv, (rows, tiles_n, tiles.split), dict(common, c_ptr=partials))
    reduce_args = {name: v for name, v in stage.constexprs().items() if name != "K"}
    launch(
        splitk_reduce,
        (rows, tiles_n),
        dict(part_ptr=partials, bias_ptr=stage.bias, c_ptr=stage.c, SPLIT=tiles.split,
             BLOCK_N=tiles.block_n, num_warps=4, **reduce_args, **args),
    )  # fmt: skip


def _launch_prefill(
    launch: Launch, stage: _Stage, tiles: GemmTiles, num_blocks: int, args: dict[str, Any]
) -> None:
    grid = (num_blocks * triton.cdiv(stage.n, tiles.block_n),)
    kwargs = dict(
        a_ptr=stage.a, w_ptr=stage.w, scale_ptr=stage.scale, zero_ptr=stage.zero, bias_ptr=stage.bias,
        c_ptr=stage.c, FORMAT=stage.format, GROUP=stage.group, BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, GROUP_M=tiles.group_m, num_warps=tiles.num_warps,
        num_stages=tiles.num_stages, **stage.constexprs(), **args,
    )  # fmt: skip
    launch(pairs_gemm, grid, kwargs)


expert_pairs_triton = TritonMoeKernel()
