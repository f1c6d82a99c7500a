"""Stage ``machine``: the device and versions, host-to-device bandwidth (pinned and pageable, one large copy
and back-to-back expert-sized copies through the runtime's own copy engine and host buffers), and device
memory bandwidth."""

from __future__ import annotations

import math
import shutil
import subprocess
import time

import torch

from offload.memory.copy_engines import make_copy_engine
from offload.memory.host_memory import host_buffer
from offload.memory.layout import ExpertLayout
from offload.memory.slot_pool import SlotPool
from offload_bench.gpu_check.part import Part
from offload_bench.machine import versions

GB = 1e9
# Expert shapes whose copies the engine issues back to back: (name, hidden, intermediate)
EXPERT_COPIES = (("qwen3-30b-a3b", 2048, 768), ("mixtral-8x7b", 4096, 14336))


def run(part: Part, seconds: float) -> None:
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


def _best(fn, repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` runs of ``fn`` (the first, cold one never wins)."""
    best = math.inf
    for _ in range(repeats):
        best = min(best, fn())
    return best


def _timed_copy(dst: torch.Tensor, src: torch.Tensor) -> float:
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


def h2d_large(device: torch.device, n: int) -> dict:
    """One ``n``-byte host-to-device copy, best of 6: from the runtime's own exact-size registered buffer
    (offload.memory.host_memory.host_buffer, as the host store pins), from torch's pinned allocator, and from
    pageable memory."""
    pinned = device.type == "cuda"
    dst = torch.empty(n, dtype=torch.uint8, device=device)
    sources = {
        "registered": host_buffer(n, pin=pinned)[0],
        "torch_pinned": torch.ones(n, dtype=torch.uint8, pin_memory=pinned),
        "pageable": torch.ones(n, dtype=torch.uint8),
    }
    out: dict[str, object] = {
        f"{name}_gb_per_s": n / _best(lambda src=src: _timed_copy(dst, src), 6) / GB
        for name, src in sources.items()
    }
    out["bytes"] = n
    out["how"] = (
        "one copy, best of 6, CUDA events"
        if pinned
        else "host memcpy (smoke run: no link, not a bandwidth figure)"
    )
    return out


def engine_copies(device: torch.device, layout: ExpertLayout, budget_bytes: int) -> dict:
    """Back-to-back expert copies as the runtime issues them: from one registered host buffer through the
    copy engine (its copy stream on CUDA) into a slot pool, timed by the engine itself and by the wall clock."""
    count = max(4, min(64, budget_bytes // layout.nbytes))
    slots = min(count, 16)
    host = host_buffer(count * layout.nbytes, pin=device.type == "cuda")[0].view(count, layout.nbytes)
    pool = SlotPool(layout, slots, device)
    engine = make_copy_engine(pool)
    best_wall = math.inf
    for _ in range(4):
        before = engine.copy_seconds
        began = time.perf_counter()
        engine.load([(i % slots, host[i]) for i in range(count)])
        engine.synchronize()
        best_wall = min(best_wall, time.perf_counter() - began)
        engine_seconds = engine.copy_seconds - before
    engine.close()
    moved = count * layout.nbytes
    return dict(
        expert_bytes=layout.nbytes,
        copies=count,
        engine_gb_per_s=moved / engine_seconds / GB if engine_seconds > 0 else None,
        wall_gb_per_s=moved / best_wall / GB,
    )


def device_copy(device: torch.device, n: int) -> dict:
    """Device memory bandwidth: a device-to-device copy of ``n`` bytes (read + write), best of 6."""
    src = torch.ones(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = _best(lambda: _timed_copy(dst, src), 6)
    return dict(
        gb_per_s=2 * n / seconds / GB,
        bytes=n,
        how="copy of n bytes counted as 2n (read + write), best of 6"
        + ("" if device.type == "cuda" else " (smoke run: host memory)"),
    )
