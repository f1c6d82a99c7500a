"""The RAM tier as a cache, for models whose experts do not fit host RAM: VRAM <- pinned RAM <- disk.

Every expert lives in the disk store (:mod:`offload.memory.disk_store`); a fixed pool of host slots
(:mod:`offload.memory.host_slots`) holds some of them, and an :class:`cache_policies.ExpertCache` (the same
class and policies as the device tier, global or per layer) decides which. The device tier's misses are this
tier's accesses: a device copy takes its source from a host slot, reading the expert from disk first when it
is not in one (:mod:`offload.memory.disk_reader`, several reads in flight at once). Host compute takes only
experts already in RAM.

Slot-safety in this tier: a host slot is never overwritten while a device copy from it may be in flight (each
slot keeps the copy engine's fence of the copies that read it, waited on before the slot is read into again),
nor while host compute reads it (:meth:`HostTier.hold`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, wait

import torch

from cache_policies import ExpertCache
from offload.errors import OffloadError
from offload.memory.disk_reader import DiskReader
from offload.memory.disk_store import DiskStore
from offload.memory.host_slots import HostSlotPool
from offload.memory.host_store import HostExpertStore
from offload.memory.layout import ExpertLayout
from offload.runtime.expert_source import Fence


class HostTier:
    """The host slots, their cache and the disk they are filled from. While loading, layers go to the disk
    store (:meth:`fill_layer`, :meth:`fill_packed_layer`); :meth:`loaded` then opens it for reading."""

    all_in_ram = False  # experts missing from the host slots are read from disk first

    def __init__(self, layout: ExpertLayout, cache: ExpertCache, pin: bool, readers: int = 4) -> None:
        self.layout = layout
        self.cache = cache
        self.num_experts = cache.num_experts
        self.batch = cache.capacity  # one access never needs more slots than its partition has
        self.pool = HostSlotPool(layout, cache.slots, pin)
        self.readers = readers
        self.disk: DiskStore | None = None
        self.reader: DiskReader | None = None
        self._fences: list[Fence | None] = [None] * cache.slots
        self._reads: list[Future[None] | None] = [None] * cache.slots  # a read into the slot in flight
        self._holds = [0] * cache.slots  # host jobs reading each slot
        self._held: tuple[int, list[int]] = (0, [])  # the layer and experts host compute reads now
        self._state = threading.Condition()

    # -- loading ---------------------------------------------------------------------------------------
    def use_store(self, disk: DiskStore) -> None:
        """The disk store this model's experts live in: being written (``write``) or complete (``read``)."""
        self.disk = disk

    def fill_layer(self, layer: int, weights: dict[str, torch.Tensor]) -> None:
        """Pack one layer from HF expert tensors (quantizing when the format asks) and write it to disk."""
        staging = HostExpertStore(self.layout, 1, self.num_experts, pin=False)
        staging.fill_layer(0, weights)
        self._write(layer, staging.layer_bytes(0))

    def fill_packed_layer(self, layer: int, fields: dict[str, torch.Tensor]) -> None:
        staging = HostExpertStore(self.layout, 1, self.num_experts, pin=False)
        staging.fill_packed_layer(0, fields)
        self._write(layer, staging.layer_bytes(0))

    def _write(self, layer: int, buffer: torch.Tensor) -> None:
        disk = self._disk()
        disk.write_layer(layer, buffer)
        if disk.state != "write":
            raise OffloadError(
                f"the disk tier could not write MoE layer {layer} to disk: see the warning above"
            )

    def loaded(self) -> None:
        """Every layer is on disk: make the store whole and start reading from it."""
        disk = self._disk()
        disk.commit()
        if disk.state != "read":
            raise OffloadError(f"the disk tier's store in {disk.folder} is not complete")
        self.reader = DiskReader(disk, self.readers)

    def _disk(self) -> DiskStore:
        if self.disk is None:
            raise RuntimeError("the host tier has no disk store yet (HostTier.use_store)")
        return self.disk

    # -- the layer step's source (offload.runtime.expert_source) ---------------------------------------
    def rows(self, layer: int, experts: Sequence[int]) -> list[torch.Tensor]:
        slots = self._resident(layer, experts)
        return [self.pool.expert(slot) for slot in slots]

    def copied(self, layer: int, experts: Sequence[int], mark: Callable[[], Fence]) -> None:
        fence = mark()
        for expert in experts:
            slot = self.cache.slot_of(layer, expert)
            assert slot is not None, "an expert copied from the host tier left it before its copy was issued"
            self._fences[slot] = fence

    @property
    def read_seconds(self) -> float:
        """Seconds one expert's read has taken, from the reads so far (0 before the first)."""
        reader = self.reader
        return reader.seconds / reader.reads if reader is not None and reader.reads else 0.0

    def in_ram(self, layer: int, expert: int) -> bool:
        """In a host slot with its read landed: a copy or host compute can start without waiting."""
        slot = self.cache.slot_of(layer, expert)
        if slot is None:
            return False
        read = self._reads[slot]
        return read is None or read.done()

    ready = in_ram  # the prefetch protocol's name for it (cache_policies.prefetch.LowerTier)

    def start_reads(self, layer: int, experts: Sequence[int]) -> list[int]:
        later = [e for e in experts if self.cache.slot_of(layer, e) is None]
        if later:
            self.read_ahead(layer, later)
        return later

    def read_ahead(self, layer: int, experts: Sequence[int]) -> None:
        """Start reading ``experts`` (ascending, not in RAM) into host slots now, without waiting: a guess of a
        coming layer's experts, so their demand copies find them in RAM. Host slots host compute reads are
        never given up for them."""
        reader = self._reader()
        held_layer, held = self._held
        plan = self.cache.prefetch(layer, experts, running_layer=held_layer, running=held)
        for expert, slot in zip(plan.experts, plan.slots, strict=True):
            self._free(slot)
            self._reads[slot] = reader.submit(layer, expert, self.pool.row(slot))

    def hold(self, layer: int, experts: Sequence[int]) -> None:
        self._resident(layer, experts)  # all hits: counted as uses of the RAM tier, nothing read
        with self._state:
            for expert in experts:
                self._holds[self._slot(layer, expert)] += 1
            self._held = (layer, list(experts))

    def unhold(self, layer: int, experts: Sequence[int]) -> None:
        with self._state:
            for expert in experts:
                self._holds[self._slot(layer, expert)] -= 1
            self._held = (0, [])
            self._state.notify_all()

    def views(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        return self.pool.views(self._slot(layer, expert))

    def _slot(self, layer: int, expert: int) -> int:
        slot = self.cache.slot_of(layer, expert)
        if slot is None:
            raise RuntimeError(f"expert {expert} of MoE layer {layer} is not in the host tier")
        return slot

    def _resident(self, layer: int, experts: Sequence[int]) -> list[int]:
        """The host slots of ``experts`` (ascending, unique, at most ``batch``), read from disk where missing."""
        if len(experts) > self.batch:
            raise ValueError(f"{len(experts)} experts in one host-tier access; at most {self.batch}")
        reader = self._reader()
        plan = self.cache.access(layer, experts)
        [wave] = plan.waves
        jobs = []
        for i, slot in enumerate(wave.slots):
            if i in wave.loads:
                self._free(slot)
                jobs.append((layer, wave.experts[i], self.pool.row(slot)))
            else:
                self._landed(slot)  # a hit whose read a guess started: wait for it
        reader.read_batch(jobs)
        return wave.slots

    def _reader(self) -> DiskReader:
        if self.reader is None:
            raise RuntimeError("the host tier is not reading yet (HostTier.loaded)")
        return self.reader

    def _landed(self, slot: int) -> None:
        read = self._reads[slot]
        if read is not None:
            read.result()
            self._reads[slot] = None

    def _free(self, slot: int) -> None:
        """Wait until nothing uses ``slot`` any more: a read into it (a guess that was never used), the last
        copies from it, any host job reading it."""
        read = self._reads[slot]
        if read is not None:
            wait([read])  # a failed read is the reader's to report: the slot is given to another expert
            self._reads[slot] = None
        fence = self._fences[slot]
        if fence is not None:
            fence()
            self._fences[slot] = None
        with self._state:
            self._state.wait_for(lambda: self._holds[slot] == 0)

    # -- counters and release --------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return self.pool.nbytes

    @property
    def pinned_nbytes(self) -> int:
        return self.pool.pinned_nbytes

    def release(self) -> None:
        """Stop reading and give the host slots back. The caller makes sure no copy still reads them."""
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        self.pool.release()
