"""The host tier's slots when experts live on disk: a fixed pool of host memory the disk tier reads experts
into and the copy engine copies them out of (:mod:`offload.runtime.host_tier` decides what lives there)."""

from __future__ import annotations

import logging

import torch

from offload.memory.disk_store import row_stride
from offload.memory.host_memory import host_buffer, mapped_zeros, pinning_error, unpin
from offload.memory.layout import ExpertLayout

log = logging.getLogger(__name__)


class HostSlotPool:
    """``num_slots`` rows of ``stride`` bytes (``layout.nbytes`` rounded up to 4 KiB) in one buffer: page-
    aligned, so a direct-I/O read lands in a row as it is, and page-locked when ``pin`` is set (exactly its
    size, :func:`offload.memory.host_memory.host_buffer`), so copies to the device run at link speed. If
    pinning fails the pool stays pageable, with one warning."""

    def __init__(self, layout: ExpertLayout, num_slots: int, pin: bool) -> None:
        if num_slots < 1:
            raise ValueError(f"a host slot pool needs at least one slot, got {num_slots}")
        self.layout = layout
        self.num_slots = num_slots
        self.stride = row_stride(layout)
        nbytes = num_slots * self.stride
        if pin:
            flat, self.pinned = host_buffer(nbytes, pin=True)
            if not self.pinned:
                log.warning(pinning_error())
        else:
            flat, self.pinned = mapped_zeros(nbytes), False
        self.data = flat.view(num_slots, self.stride)

    def row(self, slot: int) -> torch.Tensor:
        """uint8 ``[stride]``: what one disk read fills."""
        return self.data[slot]

    def expert(self, slot: int) -> torch.Tensor:
        """uint8 ``[nbytes]``: the expert in ``slot``, as the host store would hand it to a copy."""
        return self.data[slot, : self.layout.nbytes]

    def views(self, slot: int) -> dict[str, torch.Tensor]:
        """The expert's fields, as :meth:`offload.memory.host_store.HostExpertStore.views` gives them."""
        return self.layout.views(self.expert(slot))

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    @property
    def pinned_nbytes(self) -> int:
        return self.nbytes if self.pinned else 0

    def release(self) -> None:
        """Unpin and drop the buffer now. The caller makes sure no copy or read still uses it."""
        if self.data.numel():
            unpin(self.data.view(-1))
        self.data = torch.empty((0, self.stride), dtype=torch.uint8)
        self.pinned = False
