"""Int4 experts in torch's CPU int4pack layout: the host kernel's own copy of them.

``torch._weight_int4pack_mm_for_cpu`` multiplies bf16 activations by group-quantized int4 weights straight
from the blocked layout ``torch._convert_weight_to_int4pack_for_cpu`` makes, reading the packed codes once
(``docs/host-compute.md`` has the figures: about 25 times the dequantize-then-matmul route at one token).
Converting a matrix costs about 20 of its matmuls, so it is done once per expert, as its layer is stored, into
a second host copy of the int4 experts, about the size of the store itself. That doubles their host RAM, so the
copy is planned (:mod:`offload.runtime.host_plan`) and made only where it is used and fits: on a CUDA device
with host compute on, for bf16 experts (torch's kernel is vectorized for bf16 only; fp16 and fp32 run a
scalar loop slower than dequantizing).

Per expert and matrix ``W`` (``[R, C]``, codes ``q`` with per-group scale ``s`` and zero point ``z``):

=====================  ==============================  ===============================================
field                  shape                           meaning
=====================  ==============================  ===============================================
``W_int4pack``         uint8 ``[R, Cp/2]``             the codes in torch's blocked CPU layout
``W_scale_zeros``      bf16 ``[Cp/g, R, 2]``           ``(s, (8 - z) * s)``: torch reads a weight as
                                                       ``(q - 8) * s + zero``, which is ``(q - z) * s``
=====================  ==============================  ===============================================

``(8 - z) * s`` is computed in fp32 and rounded once to bf16, so a weight can differ from the dequantize
oracle's by that rounding: the kernel is checked against the oracle with a tolerance, not bitwise.
"""

from __future__ import annotations

import torch

from offload.memory import formats
from offload.memory.layout import ExpertLayout

INT4PACK_GROUPS = (32, 64, 128, 256)  # the group sizes torch's kernel takes
_ROW_MULTIPLE = 16  # torch packs rows in blocks of 16 or more


def int4pack_unsupported(layout: ExpertLayout) -> str | None:
    """Why torch's int4pack CPU kernel cannot compute ``layout``'s experts, or None when it can."""
    if layout.format != "int4":
        return f"the experts are {layout.format_name}, not int4"
    if layout.dtype != torch.bfloat16:
        return (
            f"torch's int4pack CPU kernel is vectorized for bf16 only, the model computes in {layout.dtype}"
        )
    if layout.group_size not in INT4PACK_GROUPS:
        return f"int4 group size {layout.group_size} (torch's kernel takes {INT4PACK_GROUPS})"
    for name, rows, _ in layout.matrices:
        if rows % _ROW_MULTIPLE:
            return f"{name} has {rows} rows, not a multiple of {_ROW_MULTIPLE}"
    if not hasattr(torch, "_convert_weight_to_int4pack_for_cpu"):
        return f"torch {torch.__version__} has no _convert_weight_to_int4pack_for_cpu"
    return None


def _shapes(layout: ExpertLayout) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    g = layout.group_size
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for name, rows, cols in layout.matrices:
        padded = formats.padded(cols, g)
        out[f"{name}_int4pack"] = ((rows, padded // 2), torch.uint8)
        out[f"{name}_scale_zeros"] = ((padded // g, rows, 2), layout.dtype)
    return out


def int4pack_expert_bytes(layout: ExpertLayout) -> int:
    """Host bytes of one expert's converted copy."""
    total = 0
    for shape, dtype in _shapes(layout).values():
        count = 1
        for d in shape:
            count *= d
        total += count * dtype.itemsize
    return total


def convert_expert(fields: dict[str, torch.Tensor], layout: ExpertLayout) -> dict[str, torch.Tensor]:
    """One int4 expert's store fields -> its int4pack fields (new tensors)."""
    out: dict[str, torch.Tensor] = {}
    for name, _, _ in layout.matrices:
        codes = formats.unpack_nibbles(fields[name]).to(torch.int32)  # [R, Cp]
        out[f"{name}_int4pack"] = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
        scale, zero = fields[f"{name}_scale"].float(), fields[f"{name}_zero"].float()  # [R, Cp/g]
        pairs = torch.stack((scale, (8.0 - zero) * scale), dim=-1)  # [R, Cp/g, 2]
        out[f"{name}_scale_zeros"] = pairs.transpose(0, 1).to(layout.dtype).contiguous()
    return out


class Int4PackCopy:
    """Every int4 expert of a host store in torch's CPU layout: per MoE layer, one tensor ``[experts, ...]``
    per field, filled as the store's layer is (:meth:`fill_layer`)."""

    def __init__(self, layout: ExpertLayout, num_layers: int, num_experts: int) -> None:
        reason = int4pack_unsupported(layout)
        if reason is not None:
            raise ValueError(f"no int4pack copy: {reason}")
        self.layout = layout
        self.num_experts = num_experts
        self._layers: list[dict[str, torch.Tensor] | None] = [None] * num_layers

    def fill_layer(self, layer: int, experts: list[dict[str, torch.Tensor]]) -> None:
        """Convert one layer, ``experts`` being its experts' store fields in expert order."""
        if len(experts) != self.num_experts:
            raise ValueError(f"layer {layer}: {len(experts)} experts, the store has {self.num_experts}")
        tensors = {
            name: torch.empty((self.num_experts, *shape), dtype=dtype)
            for name, (shape, dtype) in _shapes(self.layout).items()
        }
        for expert, fields in enumerate(experts):
            for name, tensor in convert_expert(fields, self.layout).items():
                tensors[name][expert].copy_(tensor)
        self._layers[layer] = tensors

    def views(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        tensors = self._layers[layer]
        if tensors is None:
            raise RuntimeError(f"MoE layer {layer} has no int4pack copy")
        return {name: tensor[expert] for name, tensor in tensors.items()}

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for layer in self._layers if layer is not None for t in layer.values())

    def release(self) -> None:
        self._layers = [None] * len(self._layers)
