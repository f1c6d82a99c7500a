"""What the benchmark machine offers and holds: host-to-device bandwidth, the bytes torch's pinned allocator
owns, versions; freeing what a finished run held. torch is imported inside each function, so importing this
module is cheap."""

from __future__ import annotations

import contextlib
import gc
import math
import platform
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SMOKE_LABEL = "CPU smoke run: not performance"


def sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_h2d_peak(device: torch.device) -> dict[str, Any]:
    """Pinned host-to-device bytes/s of one large copy, best of several; on a CPU, a labelled host memcpy."""
    import torch

    if device.type != "cuda":
        n = 1 << 26
        src, dst = torch.ones(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8)
        best = math.inf
        for _ in range(4):
            began = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - began)
        return dict(bytes_per_s=n / best, how=f"host memcpy of 64 MiB, best of 4 ({SMOKE_LABEL}: no link)")
    from offload.memory.host_memory import host_buffer, unpin

    n = 1 << 30
    dst = torch.empty(n, dtype=torch.uint8, device=device)
    out = {}
    for kind, pin in (("pinned", True), ("pageable", False)):
        # The host store's own kind of buffer: exact-size, registered with cudaHostRegister.
        src, pinned = host_buffer(n, pin=pin)
        if pin and not pinned:
            raise RuntimeError("cudaHostRegister failed: there is no pinned peak to measure")
        best = math.inf
        for _ in range(6):  # best of: the first (cold) one never wins
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        out[kind] = n / best
        unpin(src)
        del src
    del dst
    free_memory(device)
    how = (
        "one 1 GiB host-to-device copy from a registered host buffer like the store's (offload.memory."
        "host_memory), best of 6 (CUDA events); pageable: the same"
    )
    return dict(bytes_per_s=out["pinned"], pageable_bytes_per_s=out["pageable"], how=how)


def measure_expert_copies(device: torch.device, expert_bytes: int) -> float | None:
    """Bytes/s of back-to-back expert-sized pinned copies on a side stream, as the copy engine issues them."""
    import torch

    if device.type != "cuda":
        return None
    count = max(8, min(64, (1 << 31) // expert_bytes))
    src = torch.ones((count, expert_bytes), dtype=torch.uint8, pin_memory=True)
    dst = torch.empty((count, expert_bytes), dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device)
    best = math.inf
    with torch.cuda.stream(stream):
        for _ in range(4):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            for i in range(count):
                dst[i].copy_(src[i], non_blocking=True)
            end.record(stream)
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
    del src, dst
    free_memory(device)
    return count * expert_bytes / best


def torch_pinned_allocator_bytes() -> int | None:
    """Bytes of page-locked blocks torch's caching host allocator owns (``pin_memory``, in use and cached,
    each rounded up to a power of two), where this torch reports it. Memory registered with
    ``cudaHostRegister`` outside that allocator is not counted: the host store's layers are not (see
    :attr:`offload.memory.host_store.HostExpertStore.pinned_nbytes`)."""
    import torch

    stats = getattr(torch.cuda, "host_memory_stats", None)
    value = stats().get("allocated_bytes.current") if stats is not None else None
    return None if value is None else int(value)


def free_memory(device: torch.device) -> None:
    """Give back what freed models held: the device cache, cached pinned blocks, glibc's freed chunks."""
    import torch

    from offload.memory.host_memory import release_freed_host_memory

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        getattr(torch._C, "_host_emptyCache", lambda: None)()
    release_freed_host_memory()


def versions() -> dict[str, Any]:
    import torch
    import transformers

    try:
        import accelerate

        acc: str | None = accelerate.__version__
    except ImportError:
        acc = None
    return dict(
        torch=torch.__version__,
        transformers=transformers.__version__,
        accelerate=acc,
        cuda=torch.version.cuda,
        python=platform.python_version(),
    )


def rss_anon() -> int:
    """This process's anonymous resident memory (``RssAnon``, Linux): what it allocated, leaving out
    memory-mapped file pages (a checkpoint read through mmap), which are file-backed and reclaimable."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


@contextlib.contextmanager
def sampled_rss_anon(interval: float = 0.001) -> Iterator[dict[str, int]]:
    """``{"baseline", "peak"}`` of :func:`rss_anon` over the block, sampled every ``interval`` seconds on a
    side thread (and once more at the end)."""
    seen = {"baseline": rss_anon()}
    seen["peak"] = seen["baseline"]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            seen["peak"] = max(seen["peak"], rss_anon())
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield seen
    finally:
        done.set()
        sampler.join()
        seen["peak"] = max(seen["peak"], rss_anon())
