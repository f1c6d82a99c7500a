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

The layout also records the storage *format* of the two weight matrices (:mod:`offload.memory.formats`):
``float`` (the compute dtype, as above), ``int8``, ``int4``, ``mxfp4`` or ``fp8``, whose scales and zero
points are further fields of the same buffer (``gate_up_scale``, ``down_zero``, ...). ``dtype`` is always
the compute dtype: what kernels compute in and what biases are stored in.

The *packing* says how an int4 or MXFP4 matrix's fields are laid out: ``""``, as above (what quantizing and
checkpoints produce, and what the Triton kernels read), or ``"int4pack"``: the codes in torch's blocked CPU
layout and ``(scale, zero)`` pairs (``W_int4pack``, ``W_scale_zeros``; :mod:`offload.memory.int4pack`), what a
CPU device's slots hold so that torch's int4pack kernel reads them as they are
(:func:`offload.kernels.selection.device_layout`). :meth:`pack` and :meth:`repack` produce it from the
canonical fields, :meth:`weight` reads either back.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from offload.memory import formats

ALIGN = 256  # bytes


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class Field:
    name: str
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the expert's buffer
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * _itemsize(self.dtype)


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
    format: str = "float"  # storage of the weight matrices: float, int8, int4, mxfp4, fp8
    group_size: int = 0  # int4: columns per scale; mxfp4: 32; fp8: the block size; else 0
    packing: str = ""  # "": the fields above; "int4pack": int4/MXFP4 laid out for torch's CPU kernel

    def __post_init__(self) -> None:
        if self.format not in formats.FORMATS:
            raise ValueError(f"unknown expert format {self.format!r}; known: {', '.join(formats.FORMATS)}")
        if self.packing not in formats.PACKINGS:
            raise ValueError(f"unknown packing {self.packing!r}; known: int4pack")

    @property
    def canonical(self) -> ExpertLayout:
        """This layout with the format's own fields (the packing quantizing and checkpoints produce)."""
        return replace(self, packing="") if self.packing else self

    @property
    def gate_up_rows(self) -> int:
        return (2 if self.has_gate else 1) * self.intermediate_size

    @property
    def matrices(self) -> tuple[tuple[str, int, int], ...]:
        """``(name, rows, cols)`` of the two weight matrices: cols is what a matmul reduces over."""
        return (
            ("gate_up", self.gate_up_rows, self.hidden_size),
            ("down", self.hidden_size, self.intermediate_size),
        )

    @property
    def fields(self) -> tuple[Field, ...]:
        shapes: list[tuple[str, tuple[int, ...], torch.dtype]] = []
        fields_of = formats.int4pack_matrix_fields if self.packing else formats.matrix_fields
        for name, rows, cols in self.matrices:
            shapes += fields_of(name, rows, cols, self.format, self.group_size, self.dtype)
        if self.has_bias:
            shapes += [
                ("gate_up_bias", (self.gate_up_rows,), self.dtype),
                ("down_bias", (self.hidden_size,), self.dtype),
            ]
        out, offset = [], 0
        for name, shape, dtype in shapes:
            field = Field(name, shape, offset, dtype)
            out.append(field)
            offset = _align(offset + field.nbytes)
        return tuple(out)

    @property
    def element_size(self) -> int:
        """Bytes of one element of the compute dtype."""
        return _itemsize(self.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of one expert, padded: the stride between experts in the store and the slot pool."""
        last = self.fields[-1]
        return _align(last.offset + last.nbytes)

    @property
    def payload_bytes(self) -> int:
        """Bytes of weights (and scales, zero points, biases) in one expert, without padding."""
        return sum(f.nbytes for f in self.fields)

    @property
    def format_name(self) -> str:
        """What ``offload.stats`` reports: the dtype for float experts (``bf16``), else the format."""
        if self.format == "float":
            return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(
                self.dtype, str(self.dtype)
            )
        return f"int4-g{self.group_size}" if self.format == "int4" and self.group_size != 64 else self.format

    def weight(self, fields: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        """Matrix ``name`` (``gate_up`` or ``down``) as ``[..., R, C]`` in the compute dtype, read back from
        ``fields`` (one expert's views, or a slot's): the reference every kernel is checked against."""
        cols = self.hidden_size if name == "gate_up" else self.intermediate_size
        if self.packing:
            from offload.memory.int4pack import dequantize_int4pack  # it builds on this module

            return dequantize_int4pack(fields, name, self)
        return formats.dequantize(fields, name, self.format, cols, self.group_size, self.dtype)

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
            out[f.name] = buffer[..., f.offset : f.offset + f.nbytes].view(f.dtype).view(*lead, *f.shape)
        return out

    def canonicalize(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """HF experts tensors of one layer (``gate_up_proj`` or ``up_proj``, ``down_proj``, optional
        ``*_bias``; all ``[E, ...]``) -> canonical float tensors ``[E, rows, cols]`` (and biases) in the compute
        dtype: the fields of a float layout, the input of :meth:`pack` for a compressed one."""
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
        expected: dict[str, tuple[int, ...]] = {name: (rows, cols) for name, rows, cols in self.matrices}
        if self.has_bias:
            expected.update(gate_up_bias=(self.gate_up_rows,), down_bias=(self.hidden_size,))
        for name, shape in expected.items():
            got = tuple(out[name].shape[1:])
            if got != shape:
                raise ValueError(f"experts field {name}: expected per-expert shape {shape}, got {got}")
        return {name: t.to(self.dtype) for name, t in out.items()}

    def pack(self, canonical: dict[str, torch.Tensor], expert: int) -> dict[str, torch.Tensor]:
        """One expert's fields in this layout's format and packing, from the canonical float tensors ``[E, ...]``
        (:meth:`canonicalize`): the weights quantized when the format asks for it."""
        out: dict[str, torch.Tensor] = {}
        for name, _, _ in self.matrices:
            weight = canonical[name][expert]
            if self.format == "float":
                out[name] = weight
            else:
                out.update(formats.quantize(weight, name, self.format, self.group_size, self.dtype))
        for name in ("gate_up_bias", "down_bias"):
            if name in canonical:
                out[name] = canonical[name][expert]
        return self.repack(out) if self.packing else out

    def repack(self, fields: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One expert's fields in the canonical packing -> in this layout's packing (biases as they are)."""
        if not self.packing:
            return fields
        from offload.memory.int4pack import convert_expert  # it builds on this module

        out = convert_expert(fields, self.canonical)
        out.update({name: fields[name] for name in ("gate_up_bias", "down_bias") if name in fields})
        return out


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
