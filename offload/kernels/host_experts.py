"""Host kernels: one expert's rows computed on the CPU, straight from the host store's bytes.

A missed expert computed on the host is read from RAM once, in its stored format, and never copied to a slot.
Which kernel runs is chosen per format and token count by the host probe (:mod:`offload.runtime.host_rates`)
on the machine itself (:mod:`offload.kernels.kernel_table`), for the experts computed on the host beside a
GPU and for every expert of a CPU device alike; every one has the contract of
:func:`offload.kernels.torch_reference.expert_rows`, so a pair's rows are the same bits whichever of the two
runs its kernel:

=============  =======================================================================  ==================
kernel         what it does                                                              formats
=============  =======================================================================  ==================
``reference``  the device's torch reference, unchanged: weights read back to the        every format
               compute dtype (:meth:`ExpertLayout.weight`), ``F.linear`` in it. For     and packing
               float experts it is torch's GEMV on the stored weights, the fastest
               route; for many tokens, reading a compressed matrix back once and one
               GEMM beats the kernels below
``dequant``    the same math with a cheaper read-back: scales and zero points are        int4, mxfp4, fp8,
               broadcast over their groups (views) instead of expanded to full          int8
               matrices (``repeat_interleave``), then ``F.linear`` in the compute dtype.
               Same bits as the reference for int8, int4 and mxfp4 (one rounding of an
               exact product either way); fp8 is scaled in fp32 as the oracle does
``int8pack``   ``torch._weight_int8pack_mm`` on the stored codes and per-row scales:     int8
               the int8 weights are never expanded
``int4pack``   ``torch._weight_int4pack_mm_for_cpu`` on the experts' converted copy      int4, mxfp4
               (:mod:`offload.memory.int4pack`), or on a CPU device's experts stored    (bf16)
               in that packing: the packed codes are read once, never
               expanded. int4 within the oracle's tolerance, not bitwise (the zero
               point is folded into a bf16 offset); MXFP4 exact (each e2m1 value split
               into two int4 values)
=============  =======================================================================  ==================

Measured and not used (``docs/host-compute.md`` has the figures): computing float experts through an fp32
copy of the weights (slower than torch's bf16 GEMV even on AVX2); ``int4pack`` per call, converting the
store's codes each time (the conversion costs several matmuls: hence the converted copy);
``_dyn_quant_matmul_4bit`` (fast only with KleidiAI, on ARM; a reference loop on x86, 20 times slower than
``int4pack``); a dequantize-and-GEMV compiled by ``torch.compile`` (scalar loops on CPU).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from offload.kernels.activation import ExpertActivation
from offload.kernels.torch_reference import expert_rows
from offload.memory import formats
from offload.memory.int4pack import INT4PACK_FORMATS
from offload.memory.layout import ExpertLayout

HostKernel = Callable[
    [torch.Tensor, torch.Tensor, dict[str, torch.Tensor], ExpertLayout, ExpertActivation, torch.dtype],
    torch.Tensor,
]


def dequantized(fields: dict[str, torch.Tensor], layout: ExpertLayout, name: str) -> torch.Tensor:
    """Matrix ``name`` of one expert as ``[R, C]`` in the compute dtype, its scales broadcast over their groups.

    The values of :func:`offload.memory.formats.dequantize` without materializing full-size scale matrices."""
    fmt, dt = layout.format, layout.dtype
    if layout.packing:  # laid out for int4pack: read back as its reference does
        return layout.weight(fields, name)
    cols = layout.hidden_size if name == "gate_up" else layout.intermediate_size
    data = fields[name]
    rows = data.shape[0]
    if fmt == "float":
        return data
    if (
        fmt == "int8"
    ):  # |q| <= 127 and the scale are exact in dt; their product is rounded once, as the oracle's
        return data.to(dt) * fields[f"{name}_scale"].to(dt)[:, None]
    if fmt == "int4":
        g = layout.group_size
        codes = formats.unpack_nibbles(data).view(rows, -1, g).to(dt)  # [R, Cp/g, g]
        zero = fields[f"{name}_zero"].to(dt)[..., None]  # [R, Cp/g, 1]
        scale = fields[f"{name}_scale"].to(dt)[..., None]
        return ((codes - zero) * scale).view(rows, -1)[:, :cols]
    if fmt == "mxfp4" and dt in (torch.bfloat16, torch.float32):  # powers of two exact in dt (not in fp16)
        lut = torch.tensor(formats.FP4_VALUES, dtype=dt)
        values = lut[formats.unpack_nibbles(data).int()].view(rows, -1, formats.MXFP4_BLOCK)  # [R, C/32, 32]
        exponent = fields[f"{name}_scale"].to(torch.int32) - 127  # [R, C/32]
        return (values * torch.exp2(exponent.float()).to(dt)[..., None]).view(rows, cols)
    b = layout.group_size
    if fmt == "fp8" and rows % b == 0 and cols % b == 0:
        scale = fields[f"{name}_scale"]  # [R/b, C/b] fp32
        w = data.float().view(rows // b, b, cols // b, b) * scale[:, None, :, None]
        return w.view(rows, cols).to(dt)
    return formats.dequantize(fields, name, fmt, cols, layout.group_size, dt)


ExpertMatmul = Callable[[torch.Tensor, str, dict[str, torch.Tensor], ExpertLayout], torch.Tensor]


def _kernel_of(matmul: ExpertMatmul) -> HostKernel:
    """A host kernel from ``matmul(input, name, fields, layout)``, an input times one of an expert's matrices
    (``gate_up`` or ``down``) plus its bias: gate_up, the activation, down, the routing weights."""

    def rows(
        x: torch.Tensor,  # [n, H]
        w: torch.Tensor,  # [n]
        fields: dict[str, torch.Tensor],
        layout: ExpertLayout,
        activation: ExpertActivation,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:  # [n, H]
        h = activation.fn(matmul(x, "gate_up", fields, layout))  # [n, I]
        y = matmul(h, "down", fields, layout)  # [n, H]
        return (y * w[:, None]).to(out_dtype)

    return rows


def _plus_bias(y: torch.Tensor, fields: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    b = fields.get(f"{name}_bias")
    return y if b is None else y + b


def _dequant_matmul(
    inp: torch.Tensor, name: str, fields: dict[str, torch.Tensor], layout: ExpertLayout
) -> torch.Tensor:
    return F.linear(inp, dequantized(fields, layout, name), fields.get(f"{name}_bias"))


def _int8pack_matmul(
    inp: torch.Tensor, name: str, fields: dict[str, torch.Tensor], layout: ExpertLayout
) -> torch.Tensor:
    scale = fields[f"{name}_scale"]
    y = torch._weight_int8pack_mm(inp.to(scale.dtype).contiguous(), fields[name], scale)
    return _plus_bias(y, fields, name)


def _int4pack_matmul(
    inp: torch.Tensor, name: str, fields: dict[str, torch.Tensor], layout: ExpertLayout
) -> torch.Tensor:
    packed = fields[f"{name}_int4pack"]  # [R, K/2]
    if layout.format == "mxfp4":  # the copy holds each weight as two int4 halves side by side
        inp = torch.cat((inp, inp), dim=-1)
    padding = 2 * packed.shape[1] - inp.shape[1]  # int4: the last group's padding columns multiply zeros
    inp = F.pad(inp, (0, padding)) if padding else inp
    y = torch._weight_int4pack_mm_for_cpu(
        inp.to(layout.dtype).contiguous(), packed, layout.group_size, fields[f"{name}_scale_zeros"]
    )
    return _plus_bias(y, fields, name)


HOST_KERNELS: dict[str, HostKernel] = {
    "reference": expert_rows,
    "dequant": _kernel_of(_dequant_matmul),
    "int8pack": _kernel_of(_int8pack_matmul),
    "int4pack": _kernel_of(_int4pack_matmul),
}


def host_kernel_candidates(layout: ExpertLayout, int4pack: bool = False) -> tuple[str, ...]:
    """The kernels that can compute this layout's experts on the host, the reference first. ``int4pack``: the
    experts have a converted copy (:mod:`offload.memory.int4pack`), which that kernel reads. Experts in the
    int4pack packing (a CPU device's) are read by that kernel, or read back by the reference."""
    if layout.packing == "int4pack":
        return ("reference", "int4pack")
    out = ["reference"]
    if layout.format != "float":
        out.append("dequant")
    if layout.format == "int8":
        out.append("int8pack")
    if int4pack and layout.format in INT4PACK_FORMATS:
        out.append("int4pack")
    return tuple(out)


def host_kernel(name: str) -> HostKernel:
    try:
        return HOST_KERNELS[name]
    except KeyError:
        raise ValueError(f"unknown host kernel {name!r}; known: {', '.join(HOST_KERNELS)}") from None
