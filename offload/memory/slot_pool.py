"""The device tier: a fixed pool of expert slots, allocated once, and the device slot table."""

from __future__ import annotations

import torch

from offload.memory.layout import ExpertLayout


class SlotPool:
    """``num_slots`` experts' worth of device memory in one allocation, plus typed per-field views.

    ``field(name)`` is a ``[num_slots, *shape]`` view whose slot stride is ``layout.nbytes``, so a kernel
    can index weights by slot directly. The pool never decides what lives in it: the cache does.

    ``table`` (``[layers, experts]`` int32 on the device, ``-1`` until loaded) is the slot of every expert as
    of its last load: the copy engine writes an entry right after the copy into that slot, in copy order, so a
    kernel that waited for a slot's copy also sees its entry. An entry is never cleared on eviction, so it is
    right exactly for resident experts: a kernel may read the entries of the experts it was given, never
    others (``offload/runtime/layer_step.py`` passes a layer's row only for single-wave calls).
    """

    def __init__(
        self,
        layout: ExpertLayout,
        num_slots: int,
        device: torch.device,
        table_shape: tuple[int, int] = (1, 1),
    ) -> None:
        if num_slots < 1:
            raise ValueError(f"a slot pool needs at least one slot, got {num_slots}")
        self.layout = layout
        self.num_slots = num_slots
        self.device = device
        self.data = torch.empty((num_slots, layout.nbytes), dtype=torch.uint8, device=device)
        self._fields = layout.views(self.data)
        self.table = torch.full(table_shape, -1, dtype=torch.int32, device=device)
        self.table_flat = self.table.view(-1)

    def slot(self, slot: int) -> torch.Tensor:
        """uint8 ``[nbytes]`` of one slot: the destination of one copy."""
        return self.data[slot]

    def field(self, name: str) -> torch.Tensor:
        return self._fields[name]

    def slot_fields(self, slot: int) -> dict[str, torch.Tensor]:
        """Every field of one slot (``{name: [*shape]}``), as :meth:`ExpertLayout.weight` reads them."""
        return {name: view[slot] for name, view in self._fields.items()}

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def release(self) -> None:
        """Give the device memory back (to torch's allocator). The caller makes sure nothing still uses it."""
        self.data = torch.empty(0, dtype=torch.uint8, device=self.device)
        self._fields = {}
        self.table = self.table_flat = torch.empty(0, dtype=torch.int32, device=self.device)
