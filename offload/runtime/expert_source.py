"""Where the layer step takes a missed expert's bytes from: the host store (every expert in RAM) or the host tier
(experts on disk under a cache of host slots, :mod:`offload.runtime.host_tier`). The step copies through this
interface only, so the two look the same to it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from offload.memory.host_store import HostExpertStore
from offload.memory.layout import ExpertLayout

Fence = Callable[[], None]  # waits until the copies issued before it was made have read their sources


class ExpertSource(Protocol):
    layout: ExpertLayout
    batch: int  # at most this many experts per :meth:`rows` call
    all_in_ram: bool  # every expert is in RAM: no copy ever waits for a disk read

    @property
    def read_seconds(self) -> float:
        """What reading one expert from disk has taken on average (0: none was read from disk)."""
        ...

    def rows(self, layer: int, experts: Sequence[int]) -> list[torch.Tensor]:
        """uint8 ``[nbytes]`` host rows of ``experts`` (ascending, unique), for copies issued right after;
        they stay put until :meth:`copied` says the copies are issued."""
        ...

    def copied(self, layer: int, experts: Sequence[int], mark: Callable[[], Fence]) -> None:
        """The copies from :meth:`rows`' rows are issued; ``mark()`` makes a fence that waits for them."""
        ...

    def in_ram(self, layer: int, expert: int) -> bool:
        """Whether the expert can be computed on the host without a disk read."""
        ...

    def start_reads(self, layer: int, experts: Sequence[int]) -> list[int]:
        """Of ``experts`` (ascending, about to be copied), those whose bytes are not in RAM, with their reads
        started; return at once."""
        ...

    def hold(self, layer: int, experts: Sequence[int]) -> None:
        """Host compute reads these (all :meth:`in_ram`) until :meth:`unhold`: they stay put."""
        ...

    def unhold(self, layer: int, experts: Sequence[int]) -> None: ...

    def views(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """An expert's fields in host memory (host compute reads them between hold and unhold)."""
        ...


class InRam:
    """Every expert in the host store: rows are the store's, nothing is ever evicted."""

    batch = 1 << 30
    all_in_ram = True
    read_seconds = 0.0

    def __init__(self, store: HostExpertStore) -> None:
        self.store = store
        self.layout = store.layout

    def rows(self, layer: int, experts: Sequence[int]) -> list[torch.Tensor]:
        return [self.store.expert(layer, e) for e in experts]

    def copied(self, layer: int, experts: Sequence[int], mark: Callable[[], Fence]) -> None:
        pass  # the store's rows never change: no fence needed

    def in_ram(self, layer: int, expert: int) -> bool:
        return True

    def start_reads(self, layer: int, experts: Sequence[int]) -> list[int]:
        return []

    def hold(self, layer: int, experts: Sequence[int]) -> None:
        pass

    def unhold(self, layer: int, experts: Sequence[int]) -> None:
        pass

    def views(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        return self.store.views(layer, expert)
