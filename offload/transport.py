"""Copy engines: move expert bytes from the host store into slots. They copy and wait; they never decide.

Two rules hold for every engine (DESIGN invariant 3):

- a slot is never read before its copy has landed: compute calls :meth:`CopyEngine.acquire` on the slots it
  will read, which makes compute wait for exactly those copies and nothing else;
- a slot is never overwritten while a kernel may still read it: compute calls :meth:`CopyEngine.release`
  after issuing its reads, and the next copy into that slot waits for that point.

On CUDA the copies run on a dedicated stream with one "landed" and one "released" event per slot. On CPU
the copy is synchronous and both rules hold trivially.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from offload.slots import SlotPool


class CopyEngine(ABC):
    def __init__(self, pool: SlotPool) -> None:
        self.pool = pool
        self.bytes_copied = 0
        self.copies = 0

    @abstractmethod
    def load(self, loads: Sequence[tuple[int, torch.Tensor]]) -> None:
        """Start copying each ``(slot, host bytes)``; returns before the copies land where it can."""

    @abstractmethod
    def acquire(self, slots: Sequence[int]) -> None:
        """Make subsequent compute wait until the copies into ``slots`` have landed."""

    @abstractmethod
    def release(self, slots: Sequence[int]) -> None:
        """Compute has issued every read of ``slots``: later copies into them wait for those reads."""

    @abstractmethod
    def synchronize(self) -> None:
        """Wait for every copy issued so far."""

    @property
    @abstractmethod
    def copy_seconds(self) -> float:
        """Time spent copying expert bytes (not waiting for slots to be released)."""


class SyncCopyEngine(CopyEngine):
    """CPU twin: ``copy_`` on the calling thread, timed with a wall clock."""

    def __init__(self, pool: SlotPool) -> None:
        super().__init__(pool)
        self._seconds = 0.0

    def load(self, loads: Sequence[tuple[int, torch.Tensor]]) -> None:
        start = time.perf_counter()
        for slot, src in loads:
            self.pool.slot(slot).copy_(src)
            self.bytes_copied += src.numel()
        self.copies += len(loads)
        self._seconds += time.perf_counter() - start

    def acquire(self, slots: Sequence[int]) -> None:
        pass

    def release(self, slots: Sequence[int]) -> None:
        pass

    def synchronize(self) -> None:
        pass

    @property
    def copy_seconds(self) -> float:
        return self._seconds


class CudaCopyEngine(CopyEngine):
    """Copies on a dedicated stream; compute waits only on the events of the slots it reads."""

    def __init__(self, pool: SlotPool) -> None:
        super().__init__(pool)
        device = pool.device
        self.stream = torch.cuda.Stream(device=device)
        self._landed = [torch.cuda.Event() for _ in range(pool.num_slots)]
        # Waiting on an event that was never recorded returns at once, so fresh slots need no special case.
        self._released = [torch.cuda.Event() for _ in range(pool.num_slots)]
        self._timings: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._seconds = 0.0

    def load(self, loads: Sequence[tuple[int, torch.Tensor]]) -> None:
        if not loads:
            return
        stream = self.stream
        # Wait for every slot's readers first, so the timing events bracket copies only.
        for slot, _ in loads:
            stream.wait_event(self._released[slot])
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record(stream)
            for slot, src in loads:
                self.pool.slot(slot).copy_(src, non_blocking=True)
                self._landed[slot].record(stream)
                self.bytes_copied += src.numel()
            end.record(stream)
        self.copies += len(loads)
        self._timings.append((start, end))
        if len(self._timings) > 512:
            self._collect(block=False)

    def acquire(self, slots: Sequence[int]) -> None:
        compute = torch.cuda.current_stream(self.pool.device)
        for slot in slots:
            compute.wait_event(self._landed[slot])

    def release(self, slots: Sequence[int]) -> None:
        compute = torch.cuda.current_stream(self.pool.device)
        for slot in slots:
            self._released[slot].record(compute)

    def synchronize(self) -> None:
        self.stream.synchronize()

    def _collect(self, block: bool) -> None:
        pending = []
        for start, end in self._timings:
            if block:
                end.synchronize()
            if end.query():
                self._seconds += start.elapsed_time(end) / 1e3
            else:
                pending.append((start, end))
        self._timings = pending

    @property
    def copy_seconds(self) -> float:
        self._collect(block=True)
        return self._seconds


def make_copy_engine(pool: SlotPool) -> CopyEngine:
    return CudaCopyEngine(pool) if pool.device.type == "cuda" else SyncCopyEngine(pool)
