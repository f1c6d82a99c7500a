"""The canonical per-expert layout: one flat byte buffer per expert with typed views.

Every experts variant transformers has (concatenated or interleaved gate/up, transposed or not, with or
without bias, with or without a gate) is converted at load time into this one format, so one copy moves one
expert and every kernel reads a single layout:

=================  ===================  =====================================================
field              shape                meaning
=================  ===================  =====================================================
``gate_up``        ``[G * I, H]``       rows ``[0, I)`` gate, ``[I, 2I)`` up (G = 2); up only (G = 1)
``down``           ``[H, I]``           down projection
``gate_up_bias``   ``[G * I]``          only when the experts have biases
``down_bias``      ``[H]``              only when the experts have biases
=================  ===================  =====================================================

Weights are ``[out_features, in_features]`` like ``nn.Linear``. Each field starts on a 256-byte boundary
(16-byte alignment for grouped GEMMs and vector loads, with room to spare), and so does every expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ALIGN = 256  # bytes


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class Field:
    name: str
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the expert's buffer


@dataclass(frozen=True)
class ExpertLayout:
    """Bytes of one expert in the canonical format. Records where the weights came from, for the loader."""

    hidden_size: int  # H
    intermediate_size: int  # I
    has_gate: bool
    has_bias: bool
    dtype: torch.dtype
    source_concatenated: bool = True  # False: the checkpoint interleaves gate and up columns (gpt-oss)
    source_transposed: bool = False  # True: the checkpoint stores [in, out] (gpt-oss)

    @property
    def gate_up_rows(self) -> int:
        return (2 if self.has_gate else 1) * self.intermediate_size

    @property
    def fields(self) -> tuple[Field, ...]:
        shapes: list[tuple[str, tuple[int, ...]]] = [
            ("gate_up", (self.gate_up_rows, self.hidden_size)),
            ("down", (self.hidden_size, self.intermediate_size)),
        ]
        if self.has_bias:
            shapes += [("gate_up_bias", (self.gate_up_rows,)), ("down_bias", (self.hidden_size,))]
        out, offset = [], 0
        for name, shape in shapes:
            out.append(Field(name, shape, offset))
            offset = _align(offset + _numel(shape) * self.element_size)
        return tuple(out)

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        """Bytes of one expert, padded: the stride between experts in the store and the slot pool."""
        last = self.fields[-1]
        return _align(last.offset + _numel(last.shape) * self.element_size)

    @property
    def payload_bytes(self) -> int:
        """Bytes of weights (and biases) in one expert, without padding."""
        return sum(_numel(f.shape) for f in self.fields) * self.element_size

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"layout has no field {name!r}")

    def views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed views into ``buffer``: uint8 ``[..., nbytes]`` -> ``{name: [..., *shape]}``, no copies."""
        if buffer.dtype != torch.uint8 or buffer.shape[-1] != self.nbytes:
            raise ValueError(
                f"expected a uint8 buffer [..., {self.nbytes}], got {buffer.dtype} {tuple(buffer.shape)}"
            )
        lead = buffer.shape[:-1]
        out = {}
        for f in self.fields:
            size = _numel(f.shape) * self.element_size
            out[f.name] = buffer[..., f.offset : f.offset + size].view(self.dtype).view(*lead, *f.shape)
        return out

    def canonicalize(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """HF experts tensors of one layer (``gate_up_proj`` or ``up_proj``, ``down_proj``, optional
        ``*_bias``; all ``[E, ...]``) -> canonical fields ``[E, *shape]`` in this layout's dtype."""
        gate_up = weights["gate_up_proj" if self.has_gate else "up_proj"]
        down = weights["down_proj"]
        if self.source_transposed:  # stored [E, in, out]
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        out = {"gate_up": gate_up, "down": down}
        if self.has_bias:
            out["gate_up_bias"] = weights["gate_up_proj_bias" if self.has_gate else "up_proj_bias"]
            out["down_bias"] = weights["down_proj_bias"]
        if self.has_gate and not self.source_concatenated:  # rows alternate gate0, up0, gate1, up1, ...
            out["gate_up"] = torch.cat((out["gate_up"][:, 0::2], out["gate_up"][:, 1::2]), dim=1)
            if self.has_bias:
                bias = out["gate_up_bias"]
                out["gate_up_bias"] = torch.cat((bias[:, 0::2], bias[:, 1::2]), dim=1)
        for f in self.fields:
            got = tuple(out[f.name].shape[1:])
            if got != f.shape:
                raise ValueError(f"experts field {f.name}: expected per-expert shape {f.shape}, got {got}")
        return {name: t.to(self.dtype) for name, t in out.items()}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
