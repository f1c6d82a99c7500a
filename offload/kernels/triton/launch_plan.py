"""Path and tiles of one layer call's Triton launches: a pure function of the call, never of the wave.

:func:`plan_launch` picks the decode path (a GEMV per token-expert pair, split-K when the grid alone would not
fill the GPU) or the prefill path (``tl.dot`` over expert-sorted blocks), and the tiles of each stage, from
the layer call's pair counts, the expert shape and what the device offers. Every choice depends only on the
layer call, so results do not depend on the wave partition (invariant *wave-independence*).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch
import triton

from offload.memory.layout import ExpertLayout

KernelPath = Literal["decode", "prefill"]


@dataclass(frozen=True)
class GemvTiles:
    """Decode tiles of one stage: BLOCK_N output columns x BLOCK_K reduction per step, SPLIT K ranges."""

    block_n: int
    block_k: int
    split: int
    k_per_split: int
    num_warps: int = 4


@dataclass(frozen=True)
class GemmTiles:
    """Prefill tiles of one stage."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class LaunchPlan:
    path: KernelPath
    gate_up: GemvTiles | GemmTiles
    down: GemvTiles | GemmTiles


@dataclass(frozen=True)
class DeviceInfo:
    """What the heuristics need to know about the device. ``sm_count == 0`` (CPU): no split-K."""

    sm_count: int
    smem_bytes: int  # opt-in shared memory per block

    @staticmethod
    def of(device: torch.device) -> DeviceInfo:
        return _device_info(device)


@functools.cache
def _device_info(device: torch.device) -> DeviceInfo:
    if device.type != "cuda":
        return DeviceInfo(sm_count=0, smem_bytes=1 << 30)
    props = torch.cuda.get_device_properties(device)
    smem = int(getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024)
    return DeviceInfo(sm_count=int(props.multi_processor_count), smem_bytes=smem)


@dataclass(frozen=True)
class TritonMoeOptions:
    """Overrides of the launch heuristics (tests force paths and splits; the benchmark compares paths).

    ``None`` means "let :func:`plan_launch` choose". Every choice must be a function of the layer call, not
    of the wave (invariant *wave-independence*).
    """

    path: Literal["auto", "decode", "prefill"] = "auto"
    # decode while no expert has more pairs than this (a GEMV rereads an expert's tile once per pair,
    # from L2; a tl.dot block reads it once but wastes rows). Untuned: to be set from bench/kernels.py.
    decode_max_pairs_per_expert: int = 4
    split_k: int | None = None  # decode: the same forced split for both stages
    decode_block_n: int | None = None
    decode_block_k: int | None = None
    block_m: int | None = None
    block_n: int | None = None
    block_k: int | None = None
    # decode split-K aims for this many programs per SM, while a split keeps at least min_k_tiles K tiles
    programs_per_sm: int = 4
    min_k_tiles: int = 4


def _pow2_at_most(n: int, cap: int) -> int:
    return min(cap, triton.next_power_of_2(max(1, n)))


def _gemv_tiles(
    pairs: int, n: int, k: int, dual: bool, elem: int, device: DeviceInfo, opts: TritonMoeOptions
) -> GemvTiles:
    # 256 bytes of one weight row per step (16 B per lane, 16 lanes per row) and 8 KiB of weights in
    # flight per step and program, gate and up together.
    block_k = opts.decode_block_k or _pow2_at_most(k, 256 // elem)
    block_n = opts.decode_block_n or _pow2_at_most(n, 16 if dual else 32)
    k_tiles = triton.cdiv(k, block_k)
    split = opts.split_k or 1
    if opts.split_k is None and device.sm_count:
        programs = pairs * triton.cdiv(n, block_n)
        target = opts.programs_per_sm * device.sm_count
        while programs * split < target and k_tiles // (split * 2) >= opts.min_k_tiles:
            split *= 2
    k_per_split = triton.cdiv(k_tiles, split) * block_k
    split = triton.cdiv(k, k_per_split)  # no empty splits
    return GemvTiles(block_n, block_k, split, k_per_split)


def _gemm_tiles(
    avg_rows: float, n: int, k: int, dual: bool, elem: int, device: DeviceInfo, opts: TritonMoeOptions
) -> GemmTiles:
    # tl.dot needs every tile dimension >= 16
    block_m = opts.block_m or max(16, _pow2_at_most(int(avg_rows + 0.999), 128))
    block_n = opts.block_n or max(16, _pow2_at_most(n, 128 if block_m >= 64 else 64))
    if opts.block_n is None and dual and block_m == 128:
        block_n = min(block_n, 64)  # two [128, BLOCK_N] fp32 accumulators in registers
    block_k = opts.block_k or max(16, _pow2_at_most(k, 128 // elem))
    num_warps = 8 if block_m * block_n >= 128 * 128 or (dual and block_m * block_n >= 128 * 64) else 4
    num_stages = 4 if block_m <= 32 else 3
    per_stage = (block_m * block_k + (2 if dual else 1) * block_k * block_n) * elem
    while num_stages > 2 and num_stages * per_stage > device.smem_bytes:
        num_stages -= 1  # consumer GPUs have ~100 KiB of shared memory per block, H100 ~227 KiB
    return GemmTiles(block_m, block_n, block_k, num_warps=num_warps, num_stages=num_stages)


def plan_launch(
    num_pairs: int,
    max_pairs_per_expert: int,
    active_experts: int,
    layout: ExpertLayout,
    device: DeviceInfo,
    opts: TritonMoeOptions,
) -> LaunchPlan:
    """Path and tiles for one layer call: ``num_pairs = T*k``, the largest and the number of non-empty
    experts of the call (all waves together). Pure: same inputs, same plan."""
    path: KernelPath
    if opts.path == "auto":
        path = "decode" if max_pairs_per_expert <= opts.decode_max_pairs_per_expert else "prefill"
    else:
        path = opts.path
    h, i, elem = layout.hidden_size, layout.intermediate_size, layout.element_size
    dual = layout.has_gate
    if path == "decode":
        return LaunchPlan(
            path,
            _gemv_tiles(num_pairs, i, h, dual, elem, device, opts),
            _gemv_tiles(num_pairs, h, i, False, elem, device, opts),
        )
    avg = num_pairs / max(1, active_experts)
    return LaunchPlan(
        path,
        _gemm_tiles(avg, i, h, dual, elem, device, opts),
        _gemm_tiles(avg, h, i, False, elem, device, opts),
    )
