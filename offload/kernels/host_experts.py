"""Host kernels: one expert's rows computed on the CPU, straight from the host store's bytes.

A missed expert computed on the host is read from RAM once, in its stored format, and never copied to a slot.
Which kernel runs is chosen per format by the host probe (:mod:`offload.runtime.host_rates`) on the machine
itself; every one has the contract of :func:`offload.kernels.torch_reference.expert_rows`:

=============  =======================================================================  ==================
kernel         what it does                                                              formats
=============  =======================================================================  ==================
``reference``  the device's torch reference, unchanged: weights read back to the        every format
               compute dtype (:meth:`ExpertLayout.weight`), ``F.linear`` in it. On a
               CPU device the host kernel is always this one, so a pair gives the same
               bits wherever it is computed (invariant *exact-results*)
``fp32``       weights dequantized (or upcast) to fp32, computed in fp32, the rows cast  every format
               back: CPUs without native bf16 matmuls (AVX2) run fp32 GEMVs several
               times faster than bf16 ones
``int8pack``   ``torch._weight_int8pack_mm`` on the stored codes and per-row scales:     int8
               the int8 weights are never expanded
=============  =======================================================================  ==================

Not used, and why: torch's ``_weight_int4pack_mm_for_cpu`` needs its own blocked packing
(``_convert_weight_to_int4pack_for_cpu``), not the plain nibbles the store holds, so it would cost a repack of
every expert per call or a second copy of the store; ``_dyn_quant_matmul_4bit`` likewise needs weights packed by
``_dyn_quant_pack_4bit_weight`` (KleidiAI, ARM). int4, MXFP4 and FP8 experts are dequantized on the fly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from offload.kernels.activation import ExpertActivation
from offload.kernels.torch_reference import expert_rows
from offload.memory import formats
from offload.memory.layout import ExpertLayout

HostKernel = Callable[
    [torch.Tensor, torch.Tensor, dict[str, torch.Tensor], ExpertLayout, ExpertActivation, torch.dtype],
    torch.Tensor,
]


def _fp32_rows(
    x: torch.Tensor,  # [n, H]
    w: torch.Tensor,  # [n]
    fields: dict[str, torch.Tensor],
    layout: ExpertLayout,
    activation: ExpertActivation,
    out_dtype: torch.dtype,
) -> torch.Tensor:  # [n, H]
    def weight(name: str, cols: int) -> torch.Tensor:
        data = fields[name]
        if layout.format == "float":
            return data.float()
        return formats.dequantize(fields, name, layout.format, cols, layout.group_size, torch.float32)

    def bias(name: str) -> torch.Tensor | None:
        b = fields.get(name)
        return None if b is None else b.float()

    gate_up, down = weight("gate_up", layout.hidden_size), weight("down", layout.intermediate_size)
    h = F.linear(x.float(), gate_up, bias("gate_up_bias"))  # [n, G*I]
    h = activation.fn(h)  # [n, I]
    y = F.linear(h, down, bias("down_bias"))  # [n, H]
    return (y * w.float()[:, None]).to(out_dtype)


def _int8pack_rows(
    x: torch.Tensor,
    w: torch.Tensor,
    fields: dict[str, torch.Tensor],
    layout: ExpertLayout,
    activation: ExpertActivation,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    def linear(inp: torch.Tensor, name: str) -> torch.Tensor:
        scale = fields[f"{name}_scale"]
        y = torch._weight_int8pack_mm(inp.to(scale.dtype).contiguous(), fields[name], scale)
        b = fields.get(f"{name}_bias")
        return y if b is None else y + b

    h = activation.fn(linear(x, "gate_up"))  # [n, I]
    y = linear(h, "down")  # [n, H]
    return (y * w[:, None]).to(out_dtype)


HOST_KERNELS: dict[str, HostKernel] = {
    "reference": expert_rows,
    "fp32": _fp32_rows,
    "int8pack": _int8pack_rows,
}


def host_kernel_candidates(layout: ExpertLayout) -> tuple[str, ...]:
    """The kernels that can compute this layout's experts on the host, the reference first."""
    out = ["reference"]
    if layout.dtype != torch.float32 or layout.format != "float":
        out.append("fp32")
    if layout.format == "int8":
        out.append("int8pack")
    return tuple(out)


def host_kernel(name: str) -> HostKernel:
    try:
        return HOST_KERNELS[name]
    except KeyError:
        raise ValueError(f"unknown host kernel {name!r}; known: {', '.join(HOST_KERNELS)}") from None
