"""Decode path: one program per (token-expert pair, output tile, K split): a GEMV straight out of a slot.

Grid ``(rows, cdiv(N, BLOCK_N), SPLIT)``; axis 0 walks ``pairs_by_expert`` positions, so consecutive programs
that read the same weight tile belong to the same expert and hit L2. A program whose pair's expert has no
slot in this wave (``slot_map[expert] < 0``) returns at once: a wave's launch covers the position range of
its experts, and experts of other waves interleave with them.

With ``SPLIT > 1`` (the grid alone would not fill the GPU) each program writes fp32 partial sums for its K
range to a workspace and :func:`splitk_reduce` adds them in a fixed order: deterministic, no atomics.
"""

from __future__ import annotations

import triton
import triton.language as tl

from offload.kernels.triton.common import epilogue
from offload.kernels.triton.dequant import at_slot, weight_tile


@triton.jit
def _lookup(order_ptr, expert_ptr, slot_map_ptr, pos, NUM_EXPERTS: tl.constexpr):
    """Position in pairs_by_expert -> (pair id, slot or -1); the expert -> slot lookup happens here."""
    pair = tl.load(order_ptr + pos)
    expert = tl.load(expert_ptr + pair)
    valid = (expert >= 0) & (expert < NUM_EXPERTS)  # some models route padding to expert E or -1
    slot = tl.load(slot_map_ptr + expert, mask=valid, other=-1)
    return pair, slot


@triton.jit(do_not_specialize=["pos_base"])
def pairs_gemv(
    a_ptr,  # stage 1: hidden [T, K]; stage 2: h workspace [rows, K]
    order_ptr,  # [T*k] int64: pairs_by_expert
    expert_ptr,  # [T*k] int64: top_k_index, flattened
    slot_map_ptr,  # [E] int32: slot of each expert in this wave, -1 if none
    w_ptr,  # weight field of slot 0: [N_rows, K] in FORMAT (dequant.weight_tile)
    scale_ptr,  # its scale field of slot 0 (read only for compressed formats)
    zero_ptr,  # its zero-point field of slot 0 (int4 only)
    bias_ptr,  # bias field of slot 0 (read only if HAS_BIAS)
    weight_ptr,  # [T*k] routing weights (stage 2)
    c_ptr,  # SPLIT == 1: h workspace (stage 1) or out [T*k, N] (stage 2); else fp32 partials
    pos_base,  # position of row 0
    slot_bytes,  # bytes between two slots of the pool
    alpha,
    limit,
    N: tl.constexpr,  # output columns: I (stage 1) or H (stage 2)
    K: tl.constexpr,  # reduction length: H (stage 1) or I (stage 2)
    UP_OFF: tl.constexpr,  # first weight row of "up": I with a gate in stage 1, else 0
    TOP_K: tl.constexpr,
    NUM_EXPERTS: tl.constexpr,
    STAGE: tl.constexpr,
    HAS_GATE: tl.constexpr,
    DUAL: tl.constexpr,  # stage 1 with a gate: two accumulators
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    FORMAT: tl.constexpr,  # storage of the weights: dequant.FORMAT_CODES
    GROUP: tl.constexpr,  # the format's group or block size (0 for float and int8)
    SPLIT: tl.constexpr,
    K_PER_SPLIT: tl.constexpr,  # a multiple of BLOCK_K; SPLIT * K_PER_SPLIT >= K
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    pair, slot = _lookup(order_ptr, expert_ptr, slot_map_ptr, pos_base + row, NUM_EXPERTS)
    if slot < 0:
        return
    w = at_slot(w_ptr, slot, slot_bytes)
    w_scale = at_slot(scale_ptr, slot, slot_bytes)
    w_zero = at_slot(zero_ptr, slot, slot_bytes)
    if STAGE == 1:
        a = a_ptr + (pair // TOP_K) * K
    else:
        a = a_ptr + row * K

    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    up_rows = (UP_OFF + n).to(tl.int64)
    gate_rows = n.to(tl.int64)
    dtype = a_ptr.dtype.element_ty  # the compute dtype, which dequantized weights are rounded to
    # 2-D accumulators, reduced once after the loop: one reduction per program, not one per K tile
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_gate = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    k_begin = pid_s * K_PER_SPLIT
    for k0 in range(0, K_PER_SPLIT, BLOCK_K):  # constexpr bounds (runtime bounds trip the interpreter)
        k = k_begin + k0 + tl.arange(0, BLOCK_K)
        x = tl.load(a + k, mask=k < K, other=0.0).to(tl.float32)[None, :]
        up_w = weight_tile(
            w, w_scale, w_zero, up_rows, n_mask, k_begin + k0, K, BLOCK_K, 1, FORMAT, GROUP, dtype
        )
        acc += up_w.to(tl.float32) * x
        if DUAL:
            gate_w = weight_tile(
                w, w_scale, w_zero, gate_rows, n_mask, k_begin + k0, K, BLOCK_K, 1, FORMAT, GROUP, dtype
            )
            acc_gate += gate_w.to(tl.float32) * x
    up = tl.sum(acc, axis=1)
    gate = tl.sum(acc_gate, axis=1)

    if SPLIT == 1:
        epilogue(
            gate, up, n, n_mask, n_mask, row, pair, at_slot(bias_ptr, slot, slot_bytes), weight_ptr, c_ptr,
            alpha, limit, N, UP_OFF, STAGE, HAS_GATE, HAS_BIAS, ACT,
        )  # fmt: skip
    else:
        # partials [SPLIT, rows, (2 if DUAL else 1) * N] fp32: gate first, then up
        width: tl.constexpr = 2 * N if DUAL else N
        part = c_ptr + (pid_s * tl.num_programs(0) + row) * width
        tl.store(part + (width - N) + n, up, mask=n_mask)
        if DUAL:
            tl.store(part + n, gate, mask=n_mask)


@triton.jit(do_not_specialize=["pos_base"])
def splitk_reduce(
    part_ptr,  # [SPLIT, rows, width] fp32 partial sums from pairs_gemv
    order_ptr,
    expert_ptr,
    slot_map_ptr,
    bias_ptr,
    weight_ptr,
    c_ptr,
    pos_base,
    slot_bytes,
    alpha,
    limit,
    N: tl.constexpr,
    UP_OFF: tl.constexpr,
    TOP_K: tl.constexpr,
    NUM_EXPERTS: tl.constexpr,
    STAGE: tl.constexpr,
    HAS_GATE: tl.constexpr,
    DUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Grid ``(rows, cdiv(N, BLOCK_N))``: sum the SPLIT partials in order 0..SPLIT-1, then the epilogue."""
    row = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    pair, slot = _lookup(order_ptr, expert_ptr, slot_map_ptr, pos_base + row, NUM_EXPERTS)
    if slot < 0:
        return
    width: tl.constexpr = 2 * N if DUAL else N
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    up = tl.zeros([BLOCK_N], dtype=tl.float32)
    gate = tl.zeros([BLOCK_N], dtype=tl.float32)
    rows = tl.num_programs(0)
    for s in tl.static_range(SPLIT):
        part = part_ptr + (s * rows + row) * width
        up += tl.load(part + (width - N) + n, mask=n_mask, other=0.0)
        if DUAL:
            gate += tl.load(part + n, mask=n_mask, other=0.0)
    epilogue(
        gate, up, n, n_mask, n_mask, row, pair, at_slot(bias_ptr, slot, slot_bytes), weight_ptr, c_ptr,
        alpha, limit, N, UP_OFF, STAGE, HAS_GATE, HAS_BIAS, ACT,
    )  # fmt: skip
