"""Stage ``machine``: the device and versions, host-to-device bandwidth (pinned and pageable, one large copy
and back-to-back expert-sized copies through the runtime's own copy engine and host buffers), and device
memory bandwidth.

Every host-to-device figure is labelled by the memory it was copied from, as that memory really is: a buffer
asked to be page-locked that is not (``cudaHostRegister`` failed, or torch's pinned tensor is not
``is_pinned()``) is recorded as pageable, never timed under a pinned name. torch and the runtime are
imported inside the stage, so a package missing on the GPU machine fails this stage alone, with its error."""

from __future__ import annotations

import math
import shutil
import subprocess
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from offload_bench.gpu_check.part import Part

if TYPE_CHECKING:
    import torch

    from offload.memory.layout import ExpertLayout

GB = 1e9
# Expert shapes whose copies the engine issues back to back: (name, hidden, intermediate)
EXPERT_COPIES = (("qwen3-30b-a3b", 2048, 768), ("mixtral-8x7b", 4096, 14336))


def run(part: Part, seconds: float) -> None:
    import torch

    from offload.memory.layout import ExpertLayout
    from offload_bench.machine import versions

    cuda = torch.cuda.is_available() and not part.smoke
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    part.set(device=device_info(device), versions=versions())
    big = (1 << 30) if cuda else (1 << 24)
    part.set(h2d=h2d_large(device, big))
    copies = {}
    for name, hidden, inter in EXPERT_COPIES:
        layout = ExpertLayout(hidden, inter if cuda else max(1, inter // 64), True, False, torch.bfloat16)
        copies[name] = engine_copies(device, layout, budget_bytes=(2 << 30) if cuda else (8 << 20))
        part.set(h2d_expert_copies=copies)
    part.set(device_bandwidth=device_copy(device, big))


def device_info(device: torch.device) -> dict:
    import torch

    if device.type != "cuda":
        return dict(type="cpu", name="cpu", note="smoke run: no GPU")
    props = torch.cuda.get_device_properties(device)
    driver = None
    if shutil.which("nvidia-smi"):
        done = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=driver_version,pcie.link.gen.max,pcie.link.width.max",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            timeout=20,
        )
        driver = done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None
    return dict(
        type="cuda",
        name=torch.cuda.get_device_name(device),
        capability=".".join(map(str, torch.cuda.get_device_capability(device))),
        total_memory_bytes=props.total_memory,
        sm_count=props.multi_processor_count,
        driver_pcie_gen_width=driver,
        cuda_runtime=torch.version.cuda,
    )


def _best(fn: Callable[[], float], repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` runs of ``fn`` (the first, cold one never wins)."""
    best = math.inf
    for _ in range(repeats):
        best = min(best, fn())
    return best


def _timed_copy(dst: torch.Tensor, src: torch.Tensor) -> float:
    import torch

    if dst.device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    began = time.perf_counter()
    dst.copy_(src)
    return time.perf_counter() - began


def not_page_locked(asked: bool, failure: str) -> str:
    """What a host buffer that a figure would call pinned is instead: not asked to pin (no GPU), or asked, and
    ``failure`` says how that failed."""
    if not asked:
        return "pageable (not asked to pin: smoke run, no GPU)"
    return f"pageable (asked to pin, but {failure})"


def host_source(nbytes: int, pin: bool) -> tuple[torch.Tensor, dict[str, Any]]:
    """A host buffer like the host store's (``offload.memory.host_memory.host_buffer``: exact-size,
    registered with ``cudaHostRegister`` when ``pin``), and what it is: ``host_page_locked`` (the
    registration's own flag) and ``host_memory``, "registered" or why it stayed pageable (registration fails
    under a memlock limit, in some containers, under a driver cap)."""
    from offload.memory.host_memory import host_buffer

    buffer, registered = host_buffer(nbytes, pin=pin)
    label = "registered" if registered else not_page_locked(pin, "cudaHostRegister failed")
    return buffer, dict(host_page_locked=registered, host_memory=label)


def torch_pinned_source(nbytes: int, pin: bool) -> tuple[torch.Tensor, bool]:
    """``nbytes`` from torch's caching pinned allocator when ``pin``, and whether it really is page-locked."""
    import torch

    buffer = torch.ones(nbytes, dtype=torch.uint8, pin_memory=pin)
    return buffer, bool(buffer.is_pinned())


def h2d_record(
    pinned: dict[str, tuple[torch.Tensor, bool, str]],
    pageable: torch.Tensor,
    asked: bool,
    seconds_of: Callable[[torch.Tensor], float],
) -> dict[str, Any]:
    """GB/s of one copy from each source, each under the name of what it is. ``pinned``: name -> (buffer,
    whether it is page-locked, how its pinning failed if it is not); a page-locked buffer gets
    ``{name}_gb_per_s``, one that is not gets None there (it is not timed: ``pageable_gb_per_s`` is the same
    copy from pageable memory) and ``{name}_note`` says why; ``{name}_page_locked`` is the flag either way."""
    out: dict[str, Any] = {}
    for name, (src, locked, failure) in pinned.items():
        out[f"{name}_page_locked"] = locked
        if locked:
            out[f"{name}_gb_per_s"] = src.numel() / seconds_of(src) / GB
        else:
            out[f"{name}_gb_per_s"] = None
            out[f"{name}_note"] = not_page_locked(asked, failure) + ": not timed under this name"
    out["pageable_gb_per_s"] = pageable.numel() / seconds_of(pageable) / GB
    return out


def h2d_large(device: torch.device, n: int, pin: bool | None = None) -> dict:
    """One ``n``-byte host-to-device copy, best of 6: from the runtime's own exact-size registered buffer (as
    the host store pins), from torch's pinned allocator, and from pageable memory. ``pin`` (default: on CUDA)
    asks for the first two to be page-locked; each is timed under its name only if it is
    (:func:`h2d_record`)."""
    import torch

    from offload.memory.host_memory import unpin

    pin = device.type == "cuda" if pin is None else pin
    dst = torch.empty(n, dtype=torch.uint8, device=device)
    registered, label = host_source(n, pin)
    torch_pinned, torch_locked = torch_pinned_source(n, pin)
    try:
        out = h2d_record(
            {
                "registered": (registered, label["host_page_locked"], "cudaHostRegister failed"),
                "torch_pinned": (torch_pinned, torch_locked, "is_pinned() is False after pin_memory=True"),
            },
            torch.ones(n, dtype=torch.uint8),
            pin,
            lambda src: _best(lambda: _timed_copy(dst, src), 6),
        )
    finally:
        unpin(registered)
    out["bytes"] = n
    out["how"] = (
        "one copy, best of 6, CUDA events"
        if device.type == "cuda"
        else "host memcpy (smoke run: no link, not a bandwidth figure)"
    )
    return out


def engine_copies(
    device: torch.device, layout: ExpertLayout, budget_bytes: int, pin: bool | None = None
) -> dict:
    """Back-to-back expert copies as the runtime issues them: from one host buffer like the store's through
    the copy engine (its copy stream on CUDA) into a slot pool, timed by the engine itself and by the wall
    clock. The buffer is asked to be registered when ``pin`` (default: on CUDA); ``host_memory`` says what it
    is, so a failed registration gives figures labelled pageable (what the runtime itself copies from when
    pinning fails), not registered ones."""
    from offload.memory.copy_engines import make_copy_engine
    from offload.memory.host_memory import unpin
    from offload.memory.slot_pool import SlotPool

    pin = device.type == "cuda" if pin is None else pin
    count = max(4, min(64, budget_bytes // layout.nbytes))
    slots = min(count, 16)
    flat, label = host_source(count * layout.nbytes, pin)
    host = flat.view(count, layout.nbytes)
    try:
        pool = SlotPool(layout, slots, device)
        engine = make_copy_engine(pool)
        try:
            best_wall = math.inf
            for _ in range(4):
                before = engine.copy_seconds
                began = time.perf_counter()
                engine.load([(i % slots, host[i]) for i in range(count)])
                engine.synchronize()
                best_wall = min(best_wall, time.perf_counter() - began)
                engine_seconds = engine.copy_seconds - before
        finally:
            engine.close()
    finally:
        unpin(flat)
    moved = count * layout.nbytes
    return dict(
        expert_bytes=layout.nbytes,
        copies=count,
        **label,
        engine_gb_per_s=moved / engine_seconds / GB if engine_seconds > 0 else None,
        wall_gb_per_s=moved / best_wall / GB,
    )


def device_copy(device: torch.device, n: int) -> dict:
    """Device memory bandwidth: a device-to-device copy of ``n`` bytes (read + write), best of 6."""
    import torch

    src = torch.ones(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = _best(lambda: _timed_copy(dst, src), 6)
    return dict(
        gb_per_s=2 * n / seconds / GB,
        bytes=n,
        how="copy of n bytes counted as 2n (read + write), best of 6"
        + ("" if device.type == "cuda" else " (smoke run: host memory)"),
    )
