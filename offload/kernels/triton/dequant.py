"""Reading expert weights in registers, whatever their storage format (:mod:`offload.memory.formats`).

:func:`weight_tile` loads ``W[r, c]`` of one slot's matrix straight from the slot pool and returns it in the
compute dtype, so the decode GEMV and the prefill ``tl.dot`` consume every format the same way. The
dequantized value is computed in fp32 exactly as :func:`offload.memory.formats.dequantize` does (same
products, same order) and rounded once to the compute dtype: each weight the kernel multiplies is bitwise the
oracle's, so a compressed expert's error against the dequantize-then-matmul oracle is only summation order.

A tile is ``[BLOCK_N, BLOCK_K]`` for the GEMV and ``[BLOCK_K, BLOCK_N]`` for the ``tl.dot`` B operand.
Scales and zero points are addressed per element (``column // GROUP``), so any tile fits any group size
and a last group shorter than the rest needs no special case; neighbouring lanes read the same scale,
which the cache serves. Codes packed two a byte are loaded as contiguous bytes and split in registers.

FP8 and FP4 codes are decoded with integer ops into fp32 bits rather than with triton's fp8 types:
``fp8e4nv`` does not exist below sm_89, and the same code then runs on every target and in the interpreter.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Format codes, a constexpr of every kernel. The host side maps ExpertLayout.format with FORMAT_CODES.
FMT_FLOAT: tl.constexpr = tl.constexpr(0)
FMT_INT8: tl.constexpr = tl.constexpr(1)
FMT_INT4: tl.constexpr = tl.constexpr(2)
FMT_MXFP4: tl.constexpr = tl.constexpr(3)
FMT_FP8: tl.constexpr = tl.constexpr(4)

FORMAT_CODES: dict[str, int] = {"float": 0, "int8": 1, "int4": 2, "mxfp4": 3, "fp8": 4}


@triton.jit
def at_slot(field_ptr, slot, slot_bytes):
    """A pool field's pointer moved to ``slot``: every field of a slot is ``slot_bytes`` apart, whatever
    its dtype, so the element stride depends on the field. int64: slot * stride overflows int32 past 2 GiB."""
    itemsize: tl.constexpr = field_ptr.dtype.element_ty.primitive_bitwidth // 8
    return field_ptr + slot.to(tl.int64) * (slot_bytes // itemsize)


@triton.jit
def _fp4_e2m1(code):
    """int32 FP4 codes (bit 3 the sign) -> fp32: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives."""
    exp = (code >> 1) & 3
    man = code & 1
    normal = (((exp + 126) << 23) | (man << 22)).to(tl.float32, bitcast=True)  # 2^(e-1) * (1 + m/2)
    value = tl.where(exp == 0, man.to(tl.float32) * 0.5, normal)
    return tl.where((code & 8) != 0, -value, value)


@triton.jit
def _fp8_e4m3(byte):
    """int32 float8_e4m3fn bytes -> fp32 (bias 7; exponent 0 is subnormal, m/8 * 2^-6). The NaN code 0x7F
    never occurs in a checkpoint's weights and reads as 480."""
    exp = (byte >> 3) & 15
    man = byte & 7
    normal = (((exp + 120) << 23) | (man << 20)).to(tl.float32, bitcast=True)
    value = tl.where(exp == 0, man.to(tl.float32) * 0.001953125, normal)
    return tl.where((byte & 128) != 0, -value, value)


@triton.jit
def _per_column(
    ptr,  # a per-group field of this slot (scales, zero points, e8m0 exponents)
    row_first,  # int64 [BLOCK_N]: index of each tile row's first group in the field
    r_mask,
    k0,
    K: tl.constexpr,
    GROUP: tl.constexpr,
    GROUPS: tl.constexpr,  # groups per row of the field
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    OTHER: tl.constexpr,
):
    """The group value of every column of a ``[BLOCK_N, BLOCK_K]`` tile, fp32."""
    if BLOCK_K % GROUP == 0 or GROUP % BLOCK_K == 0:
        # the tile holds whole groups or lies inside one (k0 is a multiple of BLOCK_K): one load per group,
        # widened in registers, so a tile reads BLOCK_N * NG values, not a gathered tile of them
        NG: tl.constexpr = (BLOCK_K + GROUP - 1) // GROUP
        g = k0 // GROUP + tl.arange(0, NG)
        mask = r_mask[:, None] & (g < GROUPS)[None, :]
        v = tl.load(ptr + row_first[:, None] + g[None, :], mask=mask, other=OTHER).to(tl.float32)
        out = tl.broadcast_to(v[:, :, None], (BLOCK_N, NG, BLOCK_K // NG)).reshape(BLOCK_N, BLOCK_K)
    else:  # a group size that is not a power of two: groups straddle tiles, gather per column
        k = k0 + tl.arange(0, BLOCK_K)
        mask = r_mask[:, None] & (k < K)[None, :]
        out = tl.load(ptr + row_first[:, None] + (k // GROUP)[None, :], mask=mask, other=OTHER).to(tl.float32)
    return out


@triton.jit
def weight_tile(
    w_ptr,  # this slot's weight field: float [R, K], int8 [R, K], int4/mxfp4 uint8 [R, K/2], fp8 as uint8
    scale_ptr,  # this slot's scale field (unread for float)
    zero_ptr,  # this slot's zero-point field (int4 only)
    r,  # int64 [BLOCK_N] rows (output channels)
    r_mask,  # [BLOCK_N] r < R
    k0,  # first column of the tile, a multiple of BLOCK_K
    K: tl.constexpr,  # columns of the matrix (before int4 padding)
    BLOCK_K: tl.constexpr,
    K_AXIS: tl.constexpr,  # 1: a [BLOCK_N, BLOCK_K] tile (GEMV); 0: [BLOCK_K, BLOCK_N] (tl.dot's B)
    FORMAT: tl.constexpr,
    GROUP: tl.constexpr,  # int4: columns per scale; mxfp4: 32; fp8: the block side; else unused
    OUT: tl.constexpr,  # the compute dtype
):
    """``W[r, k0:k0 + BLOCK_K]`` in the compute dtype, zero where masked. Columns past K inside an int4
    row's padding read as finite values, which the kernels multiply by masked-out zero inputs."""
    BLOCK_N: tl.constexpr = r.shape[0]
    k = k0 + tl.arange(0, BLOCK_K)
    if FORMAT == FMT_FLOAT:
        if K_AXIS == 1:
            w = tl.load(
                w_ptr + r[:, None] * K + k[None, :], mask=r_mask[:, None] & (k < K)[None, :], other=0.0
            )
        else:
            w = tl.load(
                w_ptr + r[None, :] * K + k[:, None], mask=r_mask[None, :] & (k < K)[:, None], other=0.0
            )
    else:
        # compressed: built as [BLOCK_N, BLOCK_K] (groups run along the last axis), transposed for tl.dot
        mask = r_mask[:, None] & (k < K)[None, :]
        if FORMAT == FMT_INT8:
            q = tl.load(w_ptr + r[:, None] * K + k[None, :], mask=mask, other=0).to(tl.float32)
            s = tl.load(scale_ptr + r, mask=r_mask, other=0.0).to(tl.float32)  # one per output channel
            w = q * s[:, None]
        elif FORMAT == FMT_FP8:
            byte = tl.load(w_ptr + r[:, None] * K + k[None, :], mask=mask, other=0).to(tl.int32)
            BLOCKS: tl.constexpr = (K + GROUP - 1) // GROUP  # block scales per row of blocks
            s = _per_column(
                scale_ptr, (r // GROUP) * BLOCKS, r_mask, k0, K, GROUP, BLOCKS, BLOCK_N, BLOCK_K, 0.0
            )
            w = _fp8_e4m3(byte) * s
        else:
            # two codes a byte: load the tile's bytes contiguously ([BLOCK_N, BLOCK_K/2], vector loads),
            # split the nibbles and interleave them back into column order (low nibble = even column)
            if FORMAT == FMT_INT4:
                GROUPS: tl.constexpr = (K + GROUP - 1) // GROUP  # rows are padded to whole groups
            else:
                GROUPS: tl.constexpr = K // GROUP  # type: ignore[no-redef]
            ROW_BYTES: tl.constexpr = GROUPS * GROUP // 2
            half = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            byte_mask = r_mask[:, None] & (half < ROW_BYTES)[None, :]
            byte = tl.load(w_ptr + r[:, None] * ROW_BYTES + half[None, :], mask=byte_mask, other=0)
            codes = tl.interleave(byte & 15, byte >> 4).to(tl.int32)  # [BLOCK_N, BLOCK_K]
            first = r * GROUPS
            if FORMAT == FMT_INT4:
                s = _per_column(scale_ptr, first, r_mask, k0, K, GROUP, GROUPS, BLOCK_N, BLOCK_K, 0.0)
                z = _per_column(zero_ptr, first, r_mask, k0, K, GROUP, GROUPS, BLOCK_N, BLOCK_K, 0.0)
                w = (codes.to(tl.float32) - z) * s
            else:
                e8m0 = _per_column(scale_ptr, first, r_mask, k0, K, GROUP, GROUPS, BLOCK_N, BLOCK_K, 127.0)
                # 2^(e - 127) as fp32 bits: exact for e in 1..254 (e = 0, 2^-127, would read as 0)
                w = _fp4_e2m1(codes) * (e8m0.to(tl.int32) << 23).to(tl.float32, bitcast=True)
        w = w.to(OUT)  # rounded once, as formats.dequantize rounds
        if K_AXIS == 0:
            w = tl.trans(w)
    return w
