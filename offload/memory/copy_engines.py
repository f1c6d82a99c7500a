"""Copy engines: move expert bytes from the host store into slots. They copy and wait; they never decide.

Two rules hold for every engine (invariant *slot-safety*, docs/architecture.md):

- a slot is never read before its copy has landed: compute calls :meth:`CopyEngine.acquire` on the slots it
  will read, which makes compute wait for exactly those copies and nothing else;
- a slot is never overwritten while a kernel may still read it: compute calls :meth:`CopyEngine.release`
  after issuing its reads, and the next copy into that slot waits for that point.

Three engines share the interface:

- :class:`CudaCopyEngine`: copies on a dedicated stream, one "landed" and one "released" event per slot;
  compute waits only on the events of the slots it reads, so prefetch copies overlap compute.
- :class:`ThreadedCopyEngine`: the CPU twin of that: a worker thread copies while the caller computes,
  with per-slot landed/in-use state. Tests shake out races by injecting random delays before each copy
  (:func:`injected_copy_delays`); that is a testing aid, not a runtime option.
- :class:`SyncCopyEngine`: copies on the calling thread; nothing overlaps and both rules hold trivially.

``stall_seconds`` is the time compute waited for copies to land.
"""

from __future__ import annotations

import contextlib
import contextvars
import queue
import random
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence

import torch

from offload.memory.slot_pool import SlotPool

# Tests only: (low, high, seed) of the random sleep before each copy of threaded engines built meanwhile.
_INJECTED_DELAYS: contextvars.ContextVar[tuple[float, float, int] | None] = contextvars.ContextVar(
    "offload_injected_copy_delays", default=None
)


@contextlib.contextmanager
def injected_copy_delays(low: float, high: float, seed: int = 0) -> Iterator[None]:
    """Tests only: CPU copy engines built inside this block are threaded and sleep a random
    ``uniform(low, high)`` seconds before each copy, so copies and compute interleave differently run to run."""
    token = _INJECTED_DELAYS.set((low, high, seed))
    try:
        yield
    finally:
        _INJECTED_DELAYS.reset(token)


class CopyEngine(ABC):
    def __init__(self, pool: SlotPool) -> None:
        self.pool = pool
        self.bytes_copied = 0
        self.copies = 0

    @abstractmethod
    def load(self, loads: Sequence[tuple[int, torch.Tensor]], keys: Sequence[int] | None = None) -> None:
        """Start copying each ``(slot, host bytes)``, in order; returns before the copies land where it can.
        ``keys[i]``: the entry of the pool's slot table (``layer * experts + expert``) that copy ``i`` makes
        resident, written with the slot right after the copy, in copy order."""

    @abstractmethod
    def acquire(self, slots: Sequence[int]) -> None:
        """Make subsequent compute wait until the copies into ``slots`` have landed."""

    @abstractmethod
    def release(self, slots: Sequence[int]) -> None:
        """Compute has issued every read of ``slots``: later copies into them wait for those reads."""

    @abstractmethod
    def landed(self, slot: int) -> bool:
        """Whether every copy issued into ``slot`` has landed, right now (does not wait)."""

    @abstractmethod
    def mark(self) -> Callable[[], None]:
        """A wait for every copy issued so far to have read its source: the disk tier calls it before it
        overwrites a host slot a copy read from (invariant *slot-safety* in the host tier)."""

    @abstractmethod
    def synchronize(self) -> None:
        """Wait for every copy issued so far."""

    @property
    @abstractmethod
    def copy_seconds(self) -> float:
        """Time spent copying expert bytes (not waiting for slots to be released)."""

    @property
    @abstractmethod
    def stall_seconds(self) -> float:
        """Time compute waited for copies to land."""

    def close(self) -> None:  # noqa: B027 - engines without resources need nothing
        """Wait for every copy in flight, then release threads or streams; the engine is not used afterwards."""


class SyncCopyEngine(CopyEngine):
    """``copy_`` on the calling thread, timed with a wall clock: every copy is a stall."""

    def __init__(self, pool: SlotPool) -> None:
        super().__init__(pool)
        self._seconds = 0.0

    def load(self, loads: Sequence[tuple[int, torch.Tensor]], keys: Sequence[int] | None = None) -> None:
        start = time.perf_counter()
        for i, (slot, src) in enumerate(loads):
            self.pool.slot(slot).copy_(src)
            if keys is not None:
                self.pool.table_flat[keys[i]] = slot
            self.bytes_copied += src.numel()
        self.copies += len(loads)
        self._seconds += time.perf_counter() - start

    def acquire(self, slots: Sequence[int]) -> None:
        pass

    def release(self, slots: Sequence[int]) -> None:
        pass

    def landed(self, slot: int) -> bool:
        return True

    def mark(self) -> Callable[[], None]:
        return _nothing  # every copy finished before load returned

    def synchronize(self) -> None:
        pass

    @property
    def copy_seconds(self) -> float:
        return self._seconds

    @property
    def stall_seconds(self) -> float:
        return self._seconds  # the caller waited for every copy


class ThreadedCopyEngine(CopyEngine):
    """A worker thread copies while the caller computes: the CPU twin of the CUDA copy stream.

    Copies run in issue order. Per slot, ``_pending`` counts copies not yet landed and ``_in_use`` marks the
    slots compute holds between :meth:`acquire` and :meth:`release`; the worker waits for a slot to be free
    before overwriting it. ``delay=(low, high)`` (tests only) sleeps a random time before each copy to
    reorder the threads' interleavings; it is not counted as copy time.
    """

    def __init__(self, pool: SlotPool, delay: tuple[float, float] | None = None, seed: int = 0) -> None:
        super().__init__(pool)
        injected = _INJECTED_DELAYS.get()
        if delay is None and injected is not None:
            delay, seed = injected[:2], injected[2]
        self._delay = delay
        self._random = random.Random(seed)
        self._pending = [0] * pool.num_slots
        self._in_use = [False] * pool.num_slots
        self._issued = self._done = 0  # copies queued, and copies finished (in issue order)
        self._state = threading.Condition()
        self._jobs: queue.Queue[tuple[int, torch.Tensor, int] | None] = queue.Queue()
        self._copy_seconds = 0.0
        self._stall_seconds = 0.0
        self._error: BaseException | None = None
        self._worker = threading.Thread(target=self._run, name="offload-copy", daemon=True)
        self._worker.start()

    def load(self, loads: Sequence[tuple[int, torch.Tensor]], keys: Sequence[int] | None = None) -> None:
        with self._state:
            for slot, _ in loads:
                self._pending[slot] += 1
            self._issued += len(loads)
        for i, (slot, src) in enumerate(loads):
            self._jobs.put((slot, src, -1 if keys is None else keys[i]))
        self.copies += len(loads)

    def acquire(self, slots: Sequence[int]) -> None:
        start = time.perf_counter()
        with self._state:
            self._state.wait_for(lambda: self._error is not None or not any(self._pending[s] for s in slots))
            self._raise()
            for slot in slots:
                self._in_use[slot] = True
        self._stall_seconds += time.perf_counter() - start

    def release(self, slots: Sequence[int]) -> None:
        with self._state:
            for slot in slots:
                self._in_use[slot] = False
            self._state.notify_all()

    def landed(self, slot: int) -> bool:
        with self._state:
            return self._pending[slot] == 0

    def mark(self) -> Callable[[], None]:
        with self._state:
            issued = self._issued

        def wait() -> None:
            with self._state:
                self._state.wait_for(lambda: self._error is not None or self._done >= issued)
                self._raise()

        return wait

    def synchronize(self) -> None:
        with self._state:
            self._state.wait_for(lambda: self._error is not None or not any(self._pending))
            self._raise()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            slot, src, key = job
            try:
                with self._state:
                    while self._in_use[slot]:  # compute still reads it
                        self._state.wait()
                if self._delay is not None:
                    time.sleep(self._random.uniform(*self._delay))
                start = time.perf_counter()
                self.pool.slot(slot).copy_(src)
                if key >= 0:
                    self.pool.table_flat[key] = slot
                seconds = time.perf_counter() - start
            except BaseException as exc:  # surfaced to the caller at its next wait
                with self._state:
                    self._error = exc
                    self._state.notify_all()
                return
            with self._state:
                self._copy_seconds += seconds
                self.bytes_copied += src.numel()
                self._pending[slot] -= 1
                self._done += 1
                self._state.notify_all()

    def _raise(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"expert copy failed: {self._error}") from self._error

    @property
    def copy_seconds(self) -> float:
        return self._copy_seconds

    @property
    def stall_seconds(self) -> float:
        return self._stall_seconds

    def close(self) -> None:
        if self._worker.is_alive():
            self._jobs.put(None)  # after every copy already queued: the worker lands them, then stops
            self._worker.join(timeout=60)

    def __del__(self) -> None:
        self.close()


class CudaCopyEngine(CopyEngine):
    """Copies on a dedicated stream; compute waits only on the events of the slots it reads.

    Stall time is measured on the GPU: an event recorded on the compute stream just before it waits for
    the slots, and one just after; the time between them is how long compute sat waiting for copies.
    """

    def __init__(self, pool: SlotPool) -> None:
        super().__init__(pool)
        device = pool.device
        self.stream = torch.cuda.Stream(device=device)
        self._landed = [torch.cuda.Event() for _ in range(pool.num_slots)]
        # Waiting on an event that was never recorded returns at once, so fresh slots need no special case.
        self._released = [torch.cuda.Event() for _ in range(pool.num_slots)]
        self._copies: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._stalls: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._seconds = {"copy": 0.0, "stall": 0.0}
        # The copy stream writes the pool: if the pool is freed while copies are in flight (a model dropped
        # without offload.close), the allocator must not hand its memory out before they land.
        pool.data.record_stream(self.stream)
        pool.table.record_stream(self.stream)

    def load(self, loads: Sequence[tuple[int, torch.Tensor]], keys: Sequence[int] | None = None) -> None:
        if not loads:
            return
        stream = self.stream
        # Wait for every slot's readers first, so the timing events bracket copies only.
        for slot, _ in loads:
            stream.wait_event(self._released[slot])
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record(stream)
            for i, (slot, src) in enumerate(loads):
                self.pool.slot(slot).copy_(src, non_blocking=True)
                if keys is not None:  # a fill kernel with the slot as its argument: no host-to-device copy
                    self.pool.table_flat[keys[i]].fill_(slot)
                self._landed[slot].record(stream)
                self.bytes_copied += src.numel()
            end.record(stream)
        self.copies += len(loads)
        self._copies.append((start, end))
        self._collect(block=False)

    def acquire(self, slots: Sequence[int]) -> None:
        compute = torch.cuda.current_stream(self.pool.device)
        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        before.record(compute)
        for slot in slots:
            compute.wait_event(self._landed[slot])
        after.record(compute)
        self._stalls.append((before, after))
        self._collect(block=False)  # at a 100% hit rate nothing is loaded: fold the stall events here too

    def release(self, slots: Sequence[int]) -> None:
        compute = torch.cuda.current_stream(self.pool.device)
        for slot in slots:
            self._released[slot].record(compute)

    def landed(self, slot: int) -> bool:
        return self._landed[slot].query()

    def mark(self) -> Callable[[], None]:
        event = torch.cuda.Event()
        event.record(self.stream)  # after every copy issued on the stream so far
        return event.synchronize

    def synchronize(self) -> None:
        self.stream.synchronize()

    def close(self) -> None:
        # Copies may still be in flight (a prefetch issued at the last layer): the pool and the pinned store
        # must outlive them, so whoever releases those waits here first.
        self.stream.synchronize()

    def _collect(self, block: bool) -> None:
        """Fold finished timing pairs into the totals; keeps the lists short without waiting."""
        for kind, pairs in (("copy", self._copies), ("stall", self._stalls)):
            if not block and len(pairs) < 256:
                continue
            pending = []
            for start, end in pairs:
                if block:
                    end.synchronize()
                if end.query():
                    self._seconds[kind] += start.elapsed_time(end) / 1e3
                else:
                    pending.append((start, end))
            pairs[:] = pending

    @property
    def copy_seconds(self) -> float:
        self._collect(block=True)
        return self._seconds["copy"]

    @property
    def stall_seconds(self) -> float:
        self._collect(block=True)
        return self._seconds["stall"]


def _nothing() -> None:
    pass


def make_copy_engine(pool: SlotPool, kind: str = "auto", overlap: bool = False) -> CopyEngine:
    """``auto``: the CUDA stream engine on CUDA; on CPU the threaded engine when copies are to overlap compute
    (``overlap``: prefetching), else the synchronous one. ``sync`` and ``threaded`` pick a CPU engine.
    Inside :func:`injected_copy_delays` a CPU engine is always the threaded one."""
    if pool.device.type == "cuda":
        if kind not in ("auto", "cuda"):
            raise ValueError(f"copy engine {kind!r} does not run on CUDA; use auto")
        return CudaCopyEngine(pool)
    if kind == "auto":
        kind = "threaded" if overlap else "sync"
    if kind == "threaded" or _INJECTED_DELAYS.get() is not None:
        return ThreadedCopyEngine(pool)
    if kind == "sync":
        return SyncCopyEngine(pool)
    raise ValueError(f"unknown copy engine {kind!r}: use auto, sync or threaded")
