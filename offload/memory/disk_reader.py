"""Reading experts from the disk store into host slots, on I/O worker threads.

Each read is one ``preadv`` of an expert's whole row (4 KiB-aligned offset, length and destination: see
:mod:`offload.memory.disk_store`), with direct I/O (``O_DIRECT``) where the filesystem allows it: the page cache
then neither holds a second copy of what the host tier holds (doubling the RAM a model takes) nor flatters the
read rate with bytes read before. Where ``O_DIRECT`` is refused (tmpfs, some network filesystems) reads fall back
to buffered I/O, with one log line. Several reads in flight at once keep an NVMe drive's queue busy.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import logging
import os
import random
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait

import torch

from offload.memory.disk_store import DiskStore, data_offset

log = logging.getLogger(__name__)

# Tests only: (low, high, seed) of the random sleep before each read of readers built meanwhile.
_INJECTED_DELAYS: contextvars.ContextVar[tuple[float, float, int] | None] = contextvars.ContextVar(
    "offload_injected_read_delays", default=None
)


@contextlib.contextmanager
def injected_read_delays(low: float, high: float, seed: int = 0) -> Iterator[None]:
    """Tests only: disk readers built inside this block sleep a random ``uniform(low, high)`` seconds before
    each read, so reads finish in a different order run to run."""
    token = _INJECTED_DELAYS.set((low, high, seed))
    try:
        yield
    finally:
        _INJECTED_DELAYS.reset(token)


class DiskReader:
    """Reads whole expert rows of ``store`` (a complete, readable store) into caller-given aligned rows."""

    def __init__(self, store: DiskStore, workers: int = 4) -> None:
        self.store = store
        self.direct = hasattr(os, "O_DIRECT")
        self._fds: dict[int, int] = {}
        self._retired: list[int] = []
        self._offsets: dict[int, int] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="offload-read")
        injected = _INJECTED_DELAYS.get()
        self._delay = None if injected is None else injected[:2]
        self._random = random.Random(0 if injected is None else injected[2])
        self.reads = 0
        self.bytes_read = 0
        self._seconds = 0.0  # wall time with at least one read in flight
        self._in_flight = 0
        self._since = 0.0

    def submit(self, layer: int, expert: int, row: torch.Tensor) -> Future[None]:
        """Read ``expert`` of ``layer`` into ``row`` (uint8 ``[stride]``, 4 KiB-aligned) on an I/O worker."""
        return self._pool.submit(self.read, layer, expert, row)

    def read_batch(self, jobs: Sequence[tuple[int, int, torch.Tensor]]) -> None:
        """Read every ``(layer, expert, row)`` in parallel; return when all have landed, raising the first
        failure (after all have ended: none still writes its row)."""
        futures = [self.submit(layer, expert, row) for layer, expert, row in jobs]
        wait(futures)
        for future in futures:
            future.result()

    @property
    def seconds(self) -> float:
        """Wall time with at least one read in flight: reads in flight together count once."""
        with self._lock:
            return self._seconds + (time.perf_counter() - self._since if self._in_flight else 0.0)

    def read(self, layer: int, expert: int, row: torch.Tensor) -> None:
        """One expert's row into ``row``, on the calling thread."""
        with self._lock:
            if self._in_flight == 0:
                self._since = time.perf_counter()
            self._in_flight += 1
        try:
            self._read(layer, expert, row)
        finally:
            with self._lock:
                self._in_flight -= 1
                if self._in_flight == 0:
                    self._seconds += time.perf_counter() - self._since

    def _read(self, layer: int, expert: int, row: torch.Tensor) -> None:
        stride = self.store.stride
        if row.numel() != stride or row.dtype != torch.uint8:
            raise ValueError(
                f"a read needs a uint8 row of {stride} bytes, got {row.dtype} {tuple(row.shape)}"
            )
        if self._delay is not None:
            time.sleep(self._random.uniform(*self._delay))
        fd, offset = self._file(layer)
        target = memoryview(row.numpy())  # type: ignore[arg-type]  # ndarray is a writable buffer
        try:
            done = os.preadv(fd, [target], offset + expert * stride)
        except OSError as exc:
            if exc.errno != errno.EINVAL or not self.direct:
                raise
            self._buffered(str(exc))
            fd, offset = self._file(layer)
            done = os.preadv(fd, [target], offset + expert * stride)
        if done != stride:
            raise OSError(f"{self.store.path(layer)}: read {done} of {stride} bytes of expert {expert}")
        with self._lock:
            self.reads += 1
            self.bytes_read += stride

    def _file(self, layer: int) -> tuple[int, int]:
        with self._lock:
            fd = self._fds.get(layer)
            if fd is None:
                path = self.store.path(layer)
                flags = os.O_RDONLY | (os.O_DIRECT if self.direct else 0)
                try:
                    fd = os.open(path, flags)
                except OSError as exc:
                    if not self.direct or exc.errno != errno.EINVAL:
                        raise
                    self._buffered(exc.strerror or str(exc), locked=True)
                    fd = os.open(path, os.O_RDONLY)
                self._fds[layer] = fd
                self._offsets[layer] = data_offset(path)
            return fd, self._offsets[layer]

    def _buffered(self, why: str, locked: bool = False) -> None:
        """Direct I/O refused: every file reopened buffered, once, with one log line."""
        with contextlib.nullcontext() if locked else self._lock:
            if not self.direct:
                return
            self.direct = False
            log.info("disk tier: direct I/O refused here (%s); reading through the page cache", why)
            self._retired += self._fds.values()  # closed at close(): another read may still use one
            self._fds.clear()

    def close(self) -> None:
        """Wait for reads in flight, then close the files."""
        self._pool.shutdown(wait=True)
        with self._lock:
            for fd in [*self._fds.values(), *self._retired]:
                os.close(fd)
            self._fds.clear()
            self._retired.clear()
