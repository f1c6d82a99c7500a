"""Prefill path: pairs sorted by expert, cut into blocks of BLOCK_M rows of one expert, ``tl.dot`` tiles.

The host builds a block table ``[num_blocks, 3]`` = (expert, first position, end position) over
``pairs_by_expert`` for the wave's experts; each block's rows are always the same pairs of the same expert
(``pairs_by_expert`` is fixed per layer call), so a pair's tile, and so its bits, never depend on which
other experts share the wave. The program -> (block, column tile) order is grouped by GROUP_M blocks, so
the blocks of one expert reuse its weight tiles from L2.
"""

from __future__ import annotations

import triton
import triton.language as tl

from offload.kernels.triton.common import epilogue
from offload.kernels.triton.dequant import at_slot, weight_tile


@triton.jit(do_not_specialize=["num_blocks", "pos_base"])
def pairs_gemm(
    a_ptr,  # stage 1: hidden [T, K]; stage 2: h workspace [rows, K]
    order_ptr,  # [T*k] int64: pairs_by_expert
    blocks_ptr,  # [num_blocks, 3] int32: expert, first position, end position
    slot_map_ptr,  # [E] int32: slot of each expert in this wave
    w_ptr,  # weight field of slot 0: [N_rows, K] in FORMAT (dequant.weight_tile)
    scale_ptr,  # its scale field of slot 0 (read only for compressed formats)
    zero_ptr,  # its zero-point field of slot 0 (int4 only)
    bias_ptr,  # bias field of slot 0 (read only if HAS_BIAS)
    weight_ptr,  # [T*k] routing weights (stage 2)
    c_ptr,  # stage 1: h workspace [rows, N]; stage 2: out [T*k, N]
    num_blocks,
    pos_base,  # position of workspace row 0
    slot_bytes,  # bytes between two slots of the pool
    alpha,
    limit,
    N: tl.constexpr,
    K: tl.constexpr,
    UP_OFF: tl.constexpr,
    TOP_K: tl.constexpr,
    STAGE: tl.constexpr,
    HAS_GATE: tl.constexpr,
    DUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    FORMAT: tl.constexpr,  # storage of the weights: dequant.FORMAT_CODES
    GROUP: tl.constexpr,  # the format's group or block size (0 for float and int8)
    UPCAST: tl.constexpr,  # feed tl.dot fp32 tiles (bf16 tl.dot is wrong in the triton 3.6 interpreter)
    PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 tiles: "ieee" or "tf32"
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles_n: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    per_group = GROUP_M * tiles_n
    first = (pid // per_group) * GROUP_M
    size = tl.minimum(num_blocks - first, GROUP_M)
    block = first + (pid % per_group) % size
    pid_n = (pid % per_group) // size

    expert = tl.load(blocks_ptr + block * 3)
    start = tl.load(blocks_ptr + block * 3 + 1).to(tl.int64)
    end = tl.load(blocks_ptr + block * 3 + 2).to(tl.int64)
    slot = tl.load(slot_map_ptr + expert)  # the host puts only experts of this wave in the table
    w = at_slot(w_ptr, slot, slot_bytes)
    w_scale = at_slot(scale_ptr, slot, slot_bytes)
    w_zero = at_slot(zero_ptr, slot, slot_bytes)

    pos = start + tl.arange(0, BLOCK_M)
    m_mask = pos < end
    pair = tl.load(order_ptr + pos, mask=m_mask, other=0)
    row = pos - pos_base
    if STAGE == 1:
        a_rows = a_ptr + (pair // TOP_K)[:, None] * K
    else:
        a_rows = a_ptr + row[:, None] * K

    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    up_cols = (UP_OFF + n).to(tl.int64)  # weight rows, read as the columns of a [K, N] tile
    gate_cols = n.to(tl.int64)
    dtype = a_ptr.dtype.element_ty  # the compute dtype, which dequantized weights are rounded to
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # constexpr bounds (runtime bounds trip the interpreter)
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < K
        a = tl.load(a_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        # compressed weights arrive dequantized to the compute dtype, ready for a 16-bit tl.dot
        b = weight_tile(w, w_scale, w_zero, up_cols, n_mask, k0, K, BLOCK_K, 0, FORMAT, GROUP, dtype)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        else:
            a = a.to(b.dtype)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if DUAL:
            g = weight_tile(w, w_scale, w_zero, gate_cols, n_mask, k0, K, BLOCK_K, 0, FORMAT, GROUP, dtype)
            if UPCAST:
                g = g.to(tl.float32)
            acc_gate = tl.dot(a, g, acc_gate, input_precision=PRECISION)

    store_mask = m_mask[:, None] & n_mask[None, :]
    epilogue(
        acc_gate, acc, n[None, :], n_mask[None, :], store_mask, row[:, None], pair[:, None],
        at_slot(bias_ptr, slot, slot_bytes), weight_ptr, c_ptr, alpha, limit, N, UP_OFF, STAGE, HAS_GATE,
        HAS_BIAS, ACT,
    )  # fmt: skip
