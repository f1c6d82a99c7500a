"""Storage formats of expert weights: each matrix of the canonical layout in float or compressed, with what it
takes to read it back (scales, zero points) stored beside it in the same expert buffer, so one copy still
moves one expert (invariant *one-copy-one-expert*).

For a weight matrix ``W [R, C]`` (rows are outputs, ``C`` the input dimension the matmul reduces over):

=======  ===================================================================================  ============
format   fields                                                                               bits/weight
=======  ===================================================================================  ============
float    ``W`` in the compute dtype                                                           16 (bf16)
int8     ``W`` int8 ``[R, C]``, ``W_scale [R]``: symmetric per output channel, ``W = q * s``    8 + 16/C
int4     ``W`` uint8 ``[R, Cp/2]`` (two codes a byte, low nibble first; ``Cp``: C padded to    4.5 (g=64)
         the group size g), ``W_scale``, ``W_zero`` ``[R, Cp/g]``: asymmetric per group of g
         along C, ``W = (q - zero) * scale``, codes 0..15
mxfp4    ``W`` uint8 ``[R, C/2]`` (FP4 e2m1 codes, two a byte, low nibble first, in blocks of    4.25
         32 along C, as gpt-oss checkpoints store them), ``W_scale`` uint8 ``[R, C/32]``
         (e8m0: ``2^(s - 127)``)
fp8      ``W`` float8_e4m3fn ``[R, C]``, ``W_scale`` float32 ``[ceil(R/b), ceil(C/b)]``       8 (+ scales)
         (the checkpoint's inverse block scales: ``W = q * scale[r // b, c // b]``)
=======  ===================================================================================  ============

Scales and zero points of int8 and int4 are stored in the compute dtype (fp32 for fp32 models). Biases stay
in the compute dtype in every format. :func:`dequantize` is the reference every kernel is tested against
(a dequantize-then-matmul oracle); :func:`quantize` is round-to-nearest with min-max (int4) or max-abs
(int8) ranges, computed in fp32 against the scales as they will be stored.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

FORMATS = ("float", "int8", "int4", "mxfp4", "fp8")
QUANTIZE_FORMATS = ("int8", "int4")  # what full-precision experts can be quantized to while loading
NATIVE_FORMATS = ("mxfp4", "fp8")  # kept as a quantized checkpoint stores them
DEFAULT_INT4_GROUP = 64
MXFP4_BLOCK = 32
# FP4 e2m1 values by code (bit 3 is the sign), as the OCP microscaling spec and gpt-oss define them.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def scale_dtype(compute: torch.dtype) -> torch.dtype:
    """The dtype int8/int4 scales and zero points are stored in."""
    return compute if compute in (torch.bfloat16, torch.float16) else torch.float32


def padded(columns: int, group: int) -> int:
    return -(-columns // group) * group


def matrix_fields(
    name: str, rows: int, cols: int, fmt: str, group: int, compute: torch.dtype
) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """``(field name, per-expert shape, dtype)`` of one weight matrix ``[rows, cols]`` in ``fmt``."""
    if fmt == "float":
        return [(name, (rows, cols), compute)]
    if fmt == "int8":
        return [(name, (rows, cols), torch.int8), (f"{name}_scale", (rows,), scale_dtype(compute))]
    if fmt == "int4":
        cp = padded(cols, group)
        scales = (rows, cp // group)
        return [
            (name, (rows, cp // 2), torch.uint8),
            (f"{name}_scale", scales, scale_dtype(compute)),
            (f"{name}_zero", scales, scale_dtype(compute)),
        ]
    if fmt == "mxfp4":
        if cols % MXFP4_BLOCK:
            raise ValueError(f"MXFP4 needs the input dimension to be a multiple of 32, got {cols}")
        return [(name, (rows, cols // 2), torch.uint8), (f"{name}_scale", (rows, cols // 32), torch.uint8)]
    if fmt == "fp8":
        return [
            (name, (rows, cols), torch.float8_e4m3fn),
            (f"{name}_scale", (-(-rows // group), -(-cols // group)), torch.float32),
        ]
    raise ValueError(f"unknown expert format {fmt!r}; known: {', '.join(FORMATS)}")


PACKINGS = (
    "",
    "int4pack",
)  # how a matrix's fields are laid out: as above, or for torch's int4pack CPU kernel


def int4pack_columns(fmt: str, cols: int, group: int) -> int:
    """K, the columns torch's int4pack kernel reduces over for a matrix of ``cols`` columns in ``fmt``: int4's
    padded columns, or MXFP4's twice (each e2m1 value split into two int4 values, :mod:`offload.memory.int4pack`)."""
    return 2 * cols if fmt == "mxfp4" else padded(cols, group)


def int4pack_matrix_fields(
    name: str, rows: int, cols: int, fmt: str, group: int, compute: torch.dtype
) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """``(field name, per-expert shape, dtype)`` of one int4 or MXFP4 matrix in the int4pack packing: codes
    uint8 ``[R, K/2]`` in torch's blocked CPU layout and ``(scale, zero)`` pairs ``[K/g, R, 2]`` in ``compute``
    (:mod:`offload.memory.int4pack` says what they hold)."""
    if fmt not in ("int4", "mxfp4"):
        raise ValueError(f"the int4pack packing holds int4 or mxfp4 experts, not {fmt}")
    k = int4pack_columns(fmt, cols, group)
    return [
        (f"{name}_int4pack", (rows, k // 2), torch.uint8),
        (f"{name}_scale_zeros", (k // group, rows, 2), compute),
    ]


# -- reading back -----------------------------------------------------------------------------------------


def dequantize(
    fields: dict[str, torch.Tensor], name: str, fmt: str, cols: int, group: int, compute: torch.dtype
) -> torch.Tensor:
    """The matrix ``name`` as ``[..., R, C]`` in ``compute``, from its fields (one expert or a stack of them)."""
    data = fields[name]
    if fmt == "float":
        return data
    if fmt == "int8":
        return (data.float() * fields[f"{name}_scale"].float()[..., None]).to(compute)
    if fmt == "int4":
        codes = unpack_nibbles(data).float()  # [..., R, Cp]
        scale = fields[f"{name}_scale"].float().repeat_interleave(group, dim=-1)
        zero = fields[f"{name}_zero"].float().repeat_interleave(group, dim=-1)
        return ((codes - zero) * scale)[..., :cols].to(compute)
    if fmt == "mxfp4":
        lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=data.device)
        values = lut[unpack_nibbles(data).long()]  # [..., R, C]
        exponent = fields[f"{name}_scale"].to(torch.int32) - 127
        return (values * torch.exp2(exponent.float()).repeat_interleave(MXFP4_BLOCK, dim=-1)).to(compute)
    if fmt == "fp8":
        scale = fields[f"{name}_scale"]
        rows = data.shape[-2]
        full = scale.repeat_interleave(group, dim=-2).repeat_interleave(group, dim=-1)[..., :rows, :cols]
        return (data.float() * full).to(compute)
    raise ValueError(f"unknown expert format {fmt!r}")


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., n]`` -> uint8 ``[..., 2n]``: the low nibble first."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 ``[..., 2n]`` -> ``[..., n]``, the first of each pair in the low nibble."""
    pairs = codes.view(*codes.shape[:-1], -1, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)


# -- quantizing full-precision weights --------------------------------------------------------------------


def quantize(
    weight: torch.Tensor, name: str, fmt: str, group: int, compute: torch.dtype
) -> dict[str, torch.Tensor]:
    """One expert's matrix ``[R, C]`` -> its fields in ``fmt`` (``int8`` or ``int4``), computed in fp32."""
    if fmt not in QUANTIZES:
        raise ValueError(f"cannot quantize to {fmt!r}: choose one of {', '.join(QUANTIZE_FORMATS)}")
    return QUANTIZES[fmt](weight.float(), name, group, scale_dtype(compute))


def _quantize_int8(w: torch.Tensor, name: str, group: int, stored: torch.dtype) -> dict[str, torch.Tensor]:
    scale = (w.abs().amax(dim=-1) / 127.0).to(stored)  # [R], rounded as stored before it is used
    s = scale.float().clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(w / s[:, None]).clamp_(-127, 127).to(torch.int8)
    return {name: q, f"{name}_scale": scale}


def _quantize_int4(w: torch.Tensor, name: str, group: int, stored: torch.dtype) -> dict[str, torch.Tensor]:
    rows, cols = w.shape
    cp = padded(cols, group)
    if cp != cols:  # a last group shorter than the rest: padded with zeros, which kernels never read
        w = torch.nn.functional.pad(w, (0, cp - cols))
    groups = w.view(rows, cp // group, group)
    # The range always holds 0, so the zero point is a code and zeros (padding included) read back exactly.
    low, high = groups.amin(dim=-1).clamp(max=0), groups.amax(dim=-1).clamp(min=0)
    scale = ((high - low) / 15.0).to(stored)
    s = scale.float()
    s = torch.where(s > 0, s, torch.ones_like(s))  # a constant group: any scale reads it back exactly
    zero = torch.round(-low / s).clamp_(0, 15).to(stored)  # an integer code: exact in any dtype
    q = torch.round(groups / s[..., None] + zero.float()[..., None]).clamp_(0, 15).to(torch.uint8)
    return {name: pack_nibbles(q.view(rows, cp)), f"{name}_scale": scale, f"{name}_zero": zero}


QUANTIZES: dict[str, Callable[[torch.Tensor, str, int, torch.dtype], dict[str, torch.Tensor]]] = {
    "int8": _quantize_int8,
    "int4": _quantize_int4,
}
