"""The host tier: every expert of every MoE layer, packed, in (pinned) host RAM."""

from __future__ import annotations

import logging
import weakref

import torch

from offload.memory.host_memory import host_buffer, pinning_error, unpin
from offload.memory.int4pack import convert_layer
from offload.memory.layout import ExpertLayout

log = logging.getLogger(__name__)


class HostExpertStore:
    """One uint8 buffer ``[experts, layout.nbytes]`` per MoE layer; expert ``(l, e)`` is one contiguous row.

    Layers are allocated as they are filled, so host RAM grows with loading instead of up front. Buffers are
    page-locked when ``pin`` is set (exactly their size: see :func:`offload.memory.host_memory.host_buffer`),
    which lets the copy engine move them asynchronously at link speed. :meth:`release` unpins and drops them
    at once; otherwise that happens when the store is garbage-collected. If pinning fails, that layer and
    every later one stay pageable, with one warning: slower copies, never a crash.
    """

    def __init__(self, layout: ExpertLayout, num_layers: int, num_experts: int, pin: bool) -> None:
        self.layout = layout
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.pin = pin
        self._layers: list[torch.Tensor | None] = [None] * num_layers
        self._pinned = [False] * num_layers  # whether each layer's buffer is one this store registered
        # Page-locked memory is unregistered explicitly: by release(), or when the store goes.
        self._finalizer = weakref.finalize(self, _unpin_all, self._layers) if pin else None

    def fill_layer(self, layer: int, weights: dict[str, torch.Tensor]) -> None:
        """Pack one layer from HF experts tensors (see :meth:`ExpertLayout.canonicalize`), quantizing it one
        expert at a time when the layout's format is compressed (full-precision temporaries: one expert)."""
        canonical = self.layout.canonicalize(weights)
        buffer, pinned = self._new_buffer()
        views = self.layout.views(buffer)
        if self.layout.format == "float":
            for name, tensor in canonical.items():
                views[name].copy_(tensor)
        else:
            for expert in range(self.num_experts):
                for name, tensor in self.layout.pack(canonical, expert).items():
                    views[name][expert].copy_(tensor)
        self._layers[layer], self._pinned[layer] = buffer, pinned

    def fill_packed_layer(self, layer: int, fields: dict[str, torch.Tensor]) -> None:
        """Store one layer whose fields ``{name: [E, *shape]}`` are already in the layout's format (a
        checkpoint's own MXFP4 or FP8 bytes, a disk store's rows): copied as they are; in the canonical packing
        where the layout has another (a CPU device's int4pack), converted one expert at a time."""
        canonical = self.layout.canonical
        if canonical is not self.layout and set(fields) == {f.name for f in canonical.fields}:
            self._repack_layer(layer, fields)
            return
        expected = {f.name: (self.num_experts, *f.shape) for f in self.layout.fields}
        if set(fields) != set(expected):
            raise ValueError(
                f"layer {layer}: fields {sorted(fields)}, the {self.layout.format} layout has {sorted(expected)}"
            )
        buffer, pinned = self._new_buffer()
        views = self.layout.views(buffer)
        for name, tensor in fields.items():
            if tuple(tensor.shape) != expected[name]:
                raise ValueError(
                    f"layer {layer} field {name}: shape {tuple(tensor.shape)}, expected {expected[name]}"
                )
            views[name].copy_(tensor)
        self._layers[layer], self._pinned[layer] = buffer, pinned

    def _repack_layer(self, layer: int, fields: dict[str, torch.Tensor]) -> None:
        buffer, pinned = self._new_buffer()
        views = self.layout.views(buffer)
        experts = [{name: tensor[e] for name, tensor in fields.items()} for e in range(self.num_experts)]
        convert_layer(experts, self.layout.canonical, views)  # straight into the buffer
        for name in ("gate_up_bias", "down_bias"):
            if name in fields:
                views[name].copy_(fields[name])
        self._layers[layer], self._pinned[layer] = buffer, pinned

    def _new_buffer(self) -> tuple[torch.Tensor, bool]:
        """A zeroed ``[experts, nbytes]`` buffer, page-locked while pinning works, and whether it is."""
        flat, pinned = host_buffer(self.num_experts * self.layout.nbytes, self.pin)
        if self.pin and not pinned:
            log.warning(pinning_error())
            self.pin = False
        return flat.view(self.num_experts, -1), pinned

    def layer_bytes(self, layer: int) -> torch.Tensor:
        """uint8 ``[experts, nbytes]``: one layer as stored (what the disk store writes)."""
        buffer = self._layers[layer]
        if buffer is None:
            raise RuntimeError(f"MoE layer {layer} has not been loaded into the host store")
        return buffer

    def expert(self, layer: int, expert: int) -> torch.Tensor:
        """uint8 ``[nbytes]``: the bytes one copy moves."""
        return self.layer_bytes(layer)[expert]

    def views(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        return self.layout.views(self.expert(layer, expert))

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self._layers if b is not None)

    @property
    def pinned_nbytes(self) -> int:
        """Bytes of the layers held now whose buffers this store registered with CUDA (page-locked by
        ``cudaHostRegister``), counted as :attr:`nbytes` counts them: 0 for a store built with ``pin=False``,
        and short of :attr:`nbytes` when pinning failed part-way. Torch's pinned allocator never sees them."""
        return sum(
            b.numel()
            for b, pinned in zip(self._layers, self._pinned, strict=True)
            if b is not None and pinned
        )

    @property
    def complete(self) -> bool:
        return all(b is not None for b in self._layers)

    def release(self) -> None:
        """Unpin and drop every layer's buffer now. The caller makes sure no copy still reads them."""
        if self._finalizer is not None:
            self._finalizer()  # runs once: unregisters the pinned buffers
        for layer in range(self.num_layers):
            self._layers[layer] = None
            self._pinned[layer] = False


def _unpin_all(layers: list[torch.Tensor | None]) -> None:
    for buffer in layers:
        if buffer is not None:
            unpin(buffer)
