"""Int4 and MXFP4 experts in torch's CPU int4pack layout: the host kernel's own copy of them.

``torch._weight_int4pack_mm_for_cpu`` multiplies bf16 activations by group-quantized int4 weights straight
from the blocked layout ``torch._convert_weight_to_int4pack_for_cpu`` makes, reading the packed codes once
(``docs/host-compute.md`` has the figures: 10-62 times the other host kernels at one token).
Converting a matrix costs several of its matmuls (about 20 through torch's converter, 2-5 times fewer laid out
by :func:`to_int4pack_layout`), so it is done once per expert, as its layer is stored, never per call. Where:

- on a CUDA device, with host compute on, into a second host copy of the experts (:class:`Int4PackCopy`; for
  int4 about the size of the store, for MXFP4 2.4 times): the slots keep the canonical layout the Triton
  kernels read, so the copy is planned (:mod:`offload.runtime.host_plan`) and made only where it fits;
- on a CPU device, into the store itself: the experts are kept in the int4pack *packing*
  (:attr:`offload.memory.layout.ExpertLayout.packing`, :func:`packed_layout`), which the slots hold too, so
  a copy into a slot moves the kernel's own bytes and torch's kernel reads the slot as it is. The
  compressed-store cache keeps the packed store, keyed by torch's CPU layout (:func:`packing_identity`).

Both only for bf16 experts (torch's kernel is vectorized for bf16 only; fp16 and fp32 run a scalar loop slower
than dequantizing). :func:`dequantize_int4pack` reads the packing back to the compute dtype: the reference of
the packing, and what a call with many tokens multiplies.

Per expert and matrix ``W`` ``[R, C]``:

=====================  ==============================  ===============================================
field                  shape                           meaning
=====================  ==============================  ===============================================
``W_int4pack``         uint8 ``[R, K/2]``              codes in torch's blocked CPU layout, K columns
``W_scale_zeros``      bf16 ``[K/g, R, 2]``            per group of g columns ``(scale, zero)``: torch
                                                       reads a weight as ``(q - 8) * scale + zero``
=====================  ==============================  ===============================================

- **int4** (codes ``q``, per-group scale ``s`` and zero point ``z``, columns padded to ``Cp``): ``K = Cp``,
  pairs ``(s, (8 - z) * s)``, since ``(q - 8) * s + (8 - z) * s = (q - z) * s``. ``(8 - z) * s`` is rounded
  once to bf16, so a weight can differ from the dequantize oracle's by that rounding: the kernel is checked
  against the oracle with a tolerance, not bitwise.
- **MXFP4** (FP4 e2m1 codes, one power-of-two scale ``2^(e - 127)`` per 32 columns): twice an e2m1 value is
  an integer in ``{0, ±1, ±2, ±3, ±4, ±6, ±8, ±12}``, which splits into two int4 values, ``a = clamp(2v, -8,
  7)`` and ``b = 2v - a`` (in ``[-4, 5]``). The copy holds ``[a | b]`` side by side (``K = 2C``) with scale
  ``2^(e - 128)`` and zero 0 for both halves, and the kernel multiplies ``[x | x]``: every weight is exact
  (``(a + b) * 2^(e - 128)``), so the result is the oracle's up to summation order.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from offload.memory import formats
from offload.torch_threads import torch_thread_pool

if TYPE_CHECKING:  # the layout reads its int4pack packing through this module
    from offload.memory.layout import ExpertLayout

INT4PACK_FORMATS = ("int4", "mxfp4")
INT4PACK_GROUPS = (32, 64, 128, 256)  # the group sizes torch's kernel takes
_ROW_MULTIPLE = 16  # torch packs rows in blocks of 16 or more
_CHUNK_ROWS = 64  # converted in chunks of whole blocks of torch's layout (32 or 64 rows)...
_CHUNK_BYTES = 1 << 20  # ...of about this many bytes of codes

log = logging.getLogger(__name__)


def int4pack_unsupported(layout: ExpertLayout) -> str | None:
    """Why torch's int4pack CPU kernel cannot compute ``layout``'s experts, or None when it can."""
    if layout.format not in INT4PACK_FORMATS:
        return f"the experts are {layout.format_name}, not int4 or mxfp4"
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


def packed_layout(layout: ExpertLayout) -> ExpertLayout:
    """``layout`` in the int4pack packing: the fields torch's kernel reads (and the biases)."""
    return replace(layout, packing="int4pack")


def packing_identity(layout: ExpertLayout) -> str:
    """What the bytes of ``layout``'s packing depend on beyond the layout: torch's CPU layout, per capability."""
    return f"{layout.packing}|{torch.backends.cpu.get_cpu_capability()}|torch {torch.__version__}"


def _shapes(layout: ExpertLayout) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The converted copy's fields of one expert (no biases: they stay in the store)."""
    return {
        f.name: (f.shape, f.dtype)
        for f in packed_layout(layout).fields
        if f.name.endswith(("_int4pack", "_scale_zeros"))
    }


def int4pack_expert_bytes(layout: ExpertLayout) -> int:
    """Host bytes of one expert's converted copy."""
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in _shapes(layout).values())


def convert_expert(
    fields: dict[str, torch.Tensor],
    layout: ExpertLayout,
    out: dict[str, torch.Tensor] | None = None,
    torch_converter: bool = False,
) -> dict[str, torch.Tensor]:
    """One expert's store fields -> its int4pack fields, written into ``out`` (new tensors when None).
    ``torch_converter``: lay the codes out through torch's converter even where the fast path is checked
    (for the benchmark and the tests that compare them)."""
    if out is None:
        out = {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in _shapes(layout).items()}
    for name, _, _ in layout.matrices:
        if layout.format == "mxfp4":
            scale = torch.exp2(fields[f"{name}_scale"].float() - 128.0)  # [R, C/32]: 2^(e - 127) / 2
            scale = torch.cat((scale, scale), dim=1)
            offset = torch.zeros_like(scale)
        else:
            scale, zero = fields[f"{name}_scale"].float(), fields[f"{name}_zero"].float()  # [R, Cp/g]
            offset = (8.0 - zero) * scale
        codes, packed = fields[name], out[f"{name}_int4pack"]  # [R, C/2 or Cp/2], [R, K/2]
        step = max(_CHUNK_BYTES // packed.shape[1] // _CHUNK_ROWS, 1) * _CHUNK_ROWS
        lay_out = _mxfp4_to_int4pack_layout if layout.format == "mxfp4" else to_int4pack_layout
        for start in range(0, codes.shape[0], step):  # row chunks: every temporary stays in cache
            lay_out(codes[start : start + step], packed[start : start + step], torch_converter)
        pairs = out[f"{name}_scale_zeros"]  # [K/g, R, 2]
        pairs[..., 0].copy_(scale.T)
        pairs[..., 1].copy_(offset.T)
    return out


def convert_layer(
    experts: list[dict[str, torch.Tensor]], layout: ExpertLayout, out: dict[str, torch.Tensor]
) -> None:
    """One layer's experts (their store fields, in expert order) -> their int4pack fields, written into ``out``'s
    ``[experts, ...]`` tensors (other fields there are left alone)."""

    def convert(expert: int) -> None:
        convert_expert(experts[expert], layout, out={name: tensor[expert] for name, tensor in out.items()})

    # experts side by side, one intra-op thread each, rather than torch spreading each op (a byte
    # transpose, a table lookup) over the threads: on 2 cores twice as fast into memory already touched,
    # 1.0-1.5 times into fresh memory (this VM's page faults cost about as much as the conversion)
    workers = max(1, min(torch.get_num_threads(), len(experts)))
    with torch_thread_pool(workers, 1, "offload-int4pack") as pool:
        for _ in pool.map(convert, range(len(experts))):
            pass  # map raises the first conversion that failed


def _mxfp4_to_int4pack_layout(codes: torch.Tensor, out: torch.Tensor, torch_converter: bool = False) -> None:
    """e2m1 codes packed two per byte (``[R, C/2]``) -> ``[a | b]`` in torch's layout (``out`` ``[R, C]``).

    Torch lays each block of rows out column by column, so a block of ``[a | b]`` is the block of ``a`` then
    the block of ``b``, and each of their bytes is the table image of the e2m1 byte at the same place in the
    e2m1 codes' own layout (two codes of one column). So where the layout is the documented one, the codes are
    laid out once, over C columns, and mapped: half the bytes a layout of ``[a | b]`` would move. Elsewhere,
    and for the rows after the last whole block, ``[a | b]`` is built first and laid out as any int4 codes."""
    pairs = 0 if torch_converter else fast_layout_pairs()
    rows, half = codes.shape
    full = _whole_block_rows(rows, pairs)
    if full:
        laid = torch.empty((full, half), dtype=torch.uint8)
        _relayout(codes[:full], laid, pairs)
        blocks = full // (32 * pairs)
        dst = out[:full].view(blocks, 2, -1)  # each block: its a columns, then its b columns
        for i, bytes_ in enumerate(_mxfp4_split(laid)):
            dst[:, i] = bytes_.view(blocks, -1)
    if full < rows:
        _relayout(torch.cat(_mxfp4_split(codes[full:]), dim=1), out[full:], pairs)


def _mxfp4_split(codes: torch.Tensor) -> list[torch.Tensor]:
    """Bytes of two e2m1 codes -> the bytes of their int4 halves ``a + 8`` and ``b + 8``, each shaped as
    ``codes``."""
    byte = codes.reshape(-1).int()  # index_select's int32 index: int64 would cost 7x here
    return [table.index_select(0, byte).view(codes.shape) for table in _MXFP4_HALVES]


def _mxfp4_halves() -> tuple[torch.Tensor, torch.Tensor]:
    """Per byte of two e2m1 codes, the bytes of their int4 halves ``a + 8`` and ``b + 8`` (low nibble first)."""
    twice = torch.tensor([round(2 * v) for v in formats.FP4_VALUES])  # [16]
    a = twice.clamp(-8, 7)
    halves = []
    for code in (a + 8, twice - a + 8):
        byte = torch.arange(256)
        halves.append((code[byte & 0xF] | (code[byte >> 4] << 4)).to(torch.uint8))
    return halves[0], halves[1]


_MXFP4_HALVES = _mxfp4_halves()


# -- torch's blocked CPU layout --------------------------------------------------------------------------------


def to_int4pack_layout(nibbles: torch.Tensor, out: torch.Tensor, torch_converter: bool = False) -> None:
    """Codes packed two per byte (uint8 ``[R, K/2]``, low nibble first) -> ``out`` in the layout
    ``torch._convert_weight_to_int4pack_for_cpu`` makes from them.

    torch's converter reads int32 codes column by column, a scalar loop that costs about as much as 20 of its
    matmuls. On AVX2 and AVX512, whose layouts torch documents (blocks of ``32 * P`` rows, each byte holding
    rows ``d`` and ``d + 16 * P`` of one column), the same bytes come from a few vectorized uint8 ops, 2-5 times
    faster; :func:`fast_layout_pairs` checks them against torch's converter once per process. Elsewhere, or if
    they ever differ (or with ``torch_converter``), torch's converter runs."""
    _relayout(nibbles, out, 0 if torch_converter else fast_layout_pairs())


def _relayout(nibbles: torch.Tensor, out: torch.Tensor, pairs: int) -> None:
    """The documented layout for ``pairs`` P (0: torch's converter), whole blocks of ``32 * P`` rows by uint8
    ops and the rows after the last whole block by torch's converter (each block is laid out on its own)."""
    rows, half = nibbles.shape
    full = _whole_block_rows(rows, pairs)
    if full:
        block = 32 * pairs
        src = nibbles[:full].view(full // block, 2, pairs, 16, half)  # rows d (low nibble) and d + 16P (high)
        low, high = src[:, 0], src[:, 1]  # [blocks, P, 16, K/2]
        dst = out[:full].view(full // block, half, 2, pairs, 16)  # [blocks, K/2, even/odd column, P, 16]
        torch.bitwise_or(high << 4, low & 0xF, out=dst[:, :, 0].permute(0, 2, 3, 1))  # even columns
        torch.bitwise_or(high & 0xF0, low >> 4, out=dst[:, :, 1].permute(0, 2, 3, 1))  # odd columns
    if full < rows:
        out[full:] = _torch_layout(nibbles[full:])


def _whole_block_rows(rows: int, pairs: int) -> int:
    """The rows in whole blocks of ``32 * P`` (0 with P = 0: torch's converter takes every row)."""
    return rows - rows % (32 * pairs) if pairs else 0


def _torch_layout(nibbles: torch.Tensor) -> torch.Tensor:
    return torch._convert_weight_to_int4pack_for_cpu(formats.unpack_nibbles(nibbles).to(torch.int32), 1)


@functools.cache
def fast_layout_pairs() -> int:
    """P where torch's layout here is the documented one in blocks of ``32 * P`` rows (AVX2: 1, AVX512: 2),
    checked against torch's converter on random codes (two blocks and a partial one); 0 where it is not."""
    pairs = {"AVX2": 1, "AVX512": 2}.get(torch.backends.cpu.get_cpu_capability(), 0)
    if not pairs:
        return 0
    generator = torch.Generator().manual_seed(0)
    nibbles = torch.randint(0, 256, (64 * pairs + 16, 32), dtype=torch.uint8, generator=generator)
    got = torch.empty(nibbles.shape, dtype=torch.uint8)
    _relayout(nibbles, got, pairs)
    if not torch.equal(got, _torch_layout(nibbles)):
        log.warning("torch's int4pack CPU layout is not the documented one here: converting through torch")
        return 0
    return pairs


class Int4PackCopy:
    """Every expert of an int4 or MXFP4 host store in torch's CPU layout: per MoE layer, one tensor
    ``[experts, ...]`` per field, filled as the store's layer is (:meth:`fill_layer`)."""

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
        convert_layer(experts, self.layout, tensors)
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


# -- reading the packing back ----------------------------------------------------------------------------------


def dequantize_int4pack(fields: dict[str, torch.Tensor], name: str, layout: ExpertLayout) -> torch.Tensor:
    """Matrix ``name`` of one expert in the int4pack packing as ``[R, C]`` in the compute dtype: the weights
    torch's kernel multiplies, ``(q - 8) * scale + zero`` per group (for MXFP4 the two halves summed, exact),
    in the compute dtype (int4: rounded twice, product and sum). What a kernel that multiplies many tokens by
    the matrix reads (:mod:`offload.kernels.host_experts`), and the packing's reference."""
    packed, pairs = fields[f"{name}_int4pack"], fields[f"{name}_scale_zeros"]  # [R, K/2], [K/g, R, 2]
    rows, half = packed.shape
    g, dtype = layout.group_size, layout.dtype
    cols = layout.hidden_size if name == "gate_up" else layout.intermediate_size
    p = fast_layout_pairs()
    full = _whole_block_rows(rows, p)
    out = torch.empty((rows, cols), dtype=dtype)
    if full:
        codes = _unlayout_codes(packed[:full], p, dtype)  # [full, K], exact
        scale = pairs[:, :full, 0].T  # [full, K/g]
        if layout.format == "mxfp4":  # [a | b], scale 2^(e - 128) on both, zero 0: (a + b - 16) * scale
            torch.add(codes[:, :cols], codes[:, cols:], out=out[:full])
            values = out[:full].view(full, -1, g)
            values.sub_(16).mul_(scale[:, : cols // g, None])
        else:  # q * scale + (zero - 8 * scale), over the padded columns
            offset = (pairs[:, :full, 1].float() - 8 * pairs[:, :full, 0].float()).to(dtype).T
            values = codes.view(full, -1, g)
            values.mul_(scale[..., None]).add_(offset[..., None])
            if full == rows and codes.shape[1] == cols:  # no padding, no partial block: as they are
                return codes
            out[:full] = codes[:, :cols]
    if full < rows:  # rows torch laid out itself: read back through its kernel, an identity matrix's product
        eye = torch.eye(2 * half, dtype=dtype)
        tail = torch._weight_int4pack_mm_for_cpu(
            eye, packed[full:].contiguous(), g, pairs[:, full:].contiguous()
        )
        tail = tail.T  # [rows - full, K]
        out[full:] = tail[:, :cols] + tail[:, cols:] if layout.format == "mxfp4" else tail[:, :cols]
    return out


def _unlayout_codes(laid: torch.Tensor, pairs: int, dtype: torch.dtype) -> torch.Tensor:
    """Whole blocks of ``32 * P`` rows in torch's layout -> their codes 0..15 as ``[R, K]`` in ``dtype`` (exact):
    a byte of one column holds rows ``d`` (low nibble) and ``d + 16P`` (high), :func:`_relayout`'s inverse."""
    rows, half = laid.shape
    blocks = rows // (32 * pairs)
    src = laid.view(blocks, half, 2, pairs, 16).permute(0, 3, 4, 1, 2)  # [blocks, P, 16, K/2, even/odd]
    out = torch.empty((blocks, 2, pairs, 16, half, 2), dtype=dtype)  # rows d, then rows d + 16P
    torch.bitwise_and(src, 0xF, out=out[:, 0])
    torch.bitwise_right_shift(src, 4, out=out[:, 1])
    return out.view(rows, 2 * half)
