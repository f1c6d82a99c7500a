"""The measured inputs of the copy-or-compute rule, and which host kernel runs: probed once per machine and
expert shape, kept in the user cache.

- **link**: pinned host-to-device GB/s of expert-sized copies (a short probe: 64 MiB, best of 3);
- **host**: per host kernel (:mod:`offload.kernels.host_experts`), seconds per expert at 1, 4, 16, 64 and 256
  tokens on synthetic experts of the model's layout, enough of them (up to 64 MiB) that RAM, not the cache,
  feeds the kernel at the smaller counts; the fastest at each count makes the kernel table
  (:mod:`offload.kernels.kernel_table`), and its rates at 1, 4 and 16 tokens are the rule's;
- **device**: seconds of one expert call on the device at 1 token.

A CPU device has no link: ``auto`` there is ``off`` unless rates are given (``host_rates``). Its experts are all
computed by the kernel table, measured the same way (no link or device probe), and host experts there run
the same table, so a pair gives the same bits wherever it runs.

The cache is one JSON file, ``rates.json`` in the user cache folder (:mod:`offload.user_cache`), keyed by
machine (host name, CPU, torch version, device name, threads) and by expert shape and format. It is written
beside itself and renamed, and a file that does not parse is measured over.
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cache_policies import HostRates
from offload.kernels import ExpertActivation
from offload.kernels.host_experts import host_kernel, host_kernel_candidates
from offload.kernels.kernel_table import KernelTable
from offload.memory.int4pack import convert_expert
from offload.memory.layout import ExpertLayout
from offload.torch_threads import torch_thread_pool
from offload.user_cache import user_cache_dir

PROBE_TOKENS = (1, 4, 16)  # the copy-or-compute rule's points
TABLE_TOKENS = (1, 4, 16, 64, 256)  # the kernel table's
KERNELS_VERSION = 2  # bump when a host kernel's speed changes: the tables cached before measure again
_LARGE_CALL_EXPERTS = 4  # experts timed per pass above 16 tokens: compute, not RAM, bounds those calls
_PROBE_BYTES = 64 << 20  # synthetic experts per host probe: more than a last-level cache holds
_LINK_CHUNK, _LINK_CHUNKS = 4 << 20, 16  # the link probe: 16 back-to-back copies of 4 MiB


def rates_path() -> Path:
    """The rates cache file, in the user cache folder."""
    return user_cache_dir("rates.json")


def machine_key(device: torch.device, threads: int, torch_threads: int | None = None) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    each = "" if torch_threads is None else f" x {torch_threads} torch threads"
    return f"{platform.node()}|{cpu}|torch {torch.__version__}|{name}|{threads} threads{each}"


def layout_key(layout: ExpertLayout) -> str:
    gate = "gate" if layout.has_gate else "nogate"
    bias = "bias" if layout.has_bias else "nobias"
    packing = f"|{layout.packing}" if layout.packing else ""
    return (
        f"{layout.format_name}|{layout.dtype}|H{layout.hidden_size}|I{layout.intermediate_size}|{gate}|{bias}"
        f"{packing}"
    )


def resolve(
    layout: ExpertLayout,
    device: torch.device,
    threads: int,
    torch_threads: int | None,
    activation: ExpertActivation,
    need_rates: bool,
    int4pack: bool = False,
    device_room: int | None = None,
) -> tuple[KernelTable, HostRates | None]:
    """(kernel table, measured rates or None): from the cache where it has them, else probed and cached.
    ``threads`` host workers, each on ``torch_threads`` intra-op threads (None: as the process); ``int4pack``:
    the experts have a converted copy for that kernel (:mod:`offload.memory.int4pack`); ``device_room``: the
    device bytes the link and device probes may take between them (None: what they ask for). A CPU device has
    no link to weigh: no rates there."""
    need_rates = need_rates and device.type == "cuda"
    candidates = host_kernel_candidates(layout, int4pack)
    if len(candidates) == 1 and not need_rates:
        return KernelTable.single(candidates[0]), None  # nothing to weigh

    def measure() -> dict[str, Any]:
        table, host = probe_host(layout, activation, candidates, torch_threads=torch_threads)
        entry: dict[str, Any] = {"table": table.to_json(), "host_gbps": host}
        if need_rates:
            half = None if device_room is None else device_room // 2  # one after the other, each within half
            entry.update(link_gbps=probe_link(device, half), device_s=probe_device(layout, device, half))
        return entry

    needed = ("table", "host_gbps", "link_gbps", "device_s") if need_rates else ("table", "host_gbps")
    # the candidates are in the key: a kernel added or dropped since the entry was written measures again
    key = (
        f"{machine_key(device, threads, torch_threads)}||{layout_key(layout)}||{','.join(candidates)}"
        f"||v{KERNELS_VERSION}"
    )
    entry, source = cached(rates_path(), key, needed, measure)
    return KernelTable.from_json(entry["table"]), rates_of(entry, source) if need_rates else None


def rates_of(entry: dict[str, Any], source: str) -> HostRates:
    return HostRates(
        float(entry["link_gbps"]),
        tuple((int(t), float(g)) for t, g in entry["host_gbps"]),
        float(entry["device_s"]),
        source,
    )


def cached(
    path: Path, key: str, needed: tuple[str, ...], measure: Callable[[], dict[str, Any]]
) -> tuple[dict[str, Any], str]:
    """``path``'s entry ``key`` when it has every ``needed`` field ("cached"), else ``measure()``'s, stored
    there ("measured")."""
    store = _read(path)
    entry = store.get(key)
    if isinstance(entry, dict) and all(name in entry for name in needed):
        return entry, "cached"
    entry = measure()
    store[key] = entry
    _write(path, store)
    return entry, "measured"


# -- probes ------------------------------------------------------------------------------------------------


def synthetic_experts(
    layout: ExpertLayout, count: int, seed: int = 0, int4pack: bool = False
) -> list[dict[str, torch.Tensor]]:
    """``count`` experts of ``layout`` in host memory, with weights in their format's normal range;
    ``int4pack``: with their int4pack copy's fields too, as the runtime's host jobs pass them
    (:mod:`offload.memory.int4pack`; the layout must be one that kernel takes)."""
    generator = torch.Generator().manual_seed(seed)
    buffers = torch.empty((count, layout.nbytes), dtype=torch.uint8)
    views = layout.views(buffers)
    for name, tensor in views.items():
        if tensor.dtype == torch.uint8 or tensor.dtype == torch.int8:
            tensor.view(torch.uint8).copy_(torch.randint(0, 256, tensor.shape, generator=generator))
        elif tensor.is_floating_point() and tensor.element_size() >= 2:
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.02)
        else:  # fp8 codes
            tensor.copy_(torch.randn(tensor.shape, generator=generator).to(tensor.dtype))
        if name.endswith("_scale") and layout.format == "mxfp4":
            tensor.fill_(120)  # 2^-7
        elif name.endswith(("_scale", "_zero")) and tensor.is_floating_point():
            tensor.abs_().add_(0.01 if name.endswith("_scale") else 7.0)
    experts = [layout.views(buffers[i]) for i in range(count)]
    return [fields | convert_expert(fields, layout) for fields in experts] if int4pack else experts


def probe_host(
    layout: ExpertLayout,
    activation: ExpertActivation,
    kernels: tuple[str, ...],
    repeats: int = 3,
    torch_threads: int | None = None,
) -> tuple[KernelTable, list[tuple[int, float]]]:
    """The fastest of ``kernels`` at each of :data:`TABLE_TOKENS` tokens, and the (tokens, GB/s of expert
    bytes) of the fastest at each of :data:`PROBE_TOKENS`, on synthetic experts, each call on
    ``torch_threads`` intra-op threads as a host worker runs it (None: the caller's)."""
    count = max(2, min(32, _PROBE_BYTES // layout.nbytes))
    experts = synthetic_experts(layout, count, int4pack="int4pack" in kernels and not layout.packing)
    points, rates = [], []
    for n in TABLE_TOKENS:
        timed = experts if n <= 16 else experts[:_LARGE_CALL_EXPERTS]
        seconds = {
            name: host_seconds(name, layout, activation, timed, n, repeats, torch_threads) for name in kernels
        }
        best = min(kernels, key=seconds.__getitem__)  # ties: the earlier candidate, the reference first
        points.append((n, best))
        if n in PROBE_TOKENS:
            rates.append((n, layout.nbytes / seconds[best] / 1e9))
    return KernelTable(tuple(points)), rates


def host_seconds(
    kernel_name: str,
    layout: ExpertLayout,
    activation: ExpertActivation,
    experts: list[dict[str, torch.Tensor]],
    tokens: int,
    repeats: int = 3,
    torch_threads: int | None = None,
) -> float:
    """Seconds per expert call of ``kernel_name`` at ``tokens`` tokens: a pass over ``experts``, best of
    ``repeats`` (the first pass warms up); on a thread of ``torch_threads`` intra-op threads when given."""
    if torch_threads is not None:
        with torch_thread_pool(1, torch_threads) as worker:
            return worker.submit(
                host_seconds, kernel_name, layout, activation, experts, tokens, repeats
            ).result()
    kernel = host_kernel(kernel_name)
    x = torch.randn(tokens, layout.hidden_size).to(layout.dtype)
    w = torch.ones(tokens, dtype=layout.dtype)
    best = math.inf
    with torch.no_grad():
        for _ in range(repeats + 1):
            began = time.perf_counter()
            for fields in experts:
                kernel(x, w, fields, layout, activation, layout.dtype)
            best = min(best, (time.perf_counter() - began) / len(experts))
    return best


def probe_link(device: torch.device, room: int | None = None) -> float:
    """Pinned host-to-device GB/s of back-to-back 4 MiB copies, 64 MiB in all (fewer where ``room`` device
    bytes are all the probe may take), best of 3."""
    count = link_chunks(room)
    src = torch.empty((count, _LINK_CHUNK), dtype=torch.uint8, pin_memory=True)
    dst = torch.empty((count, _LINK_CHUNK), dtype=torch.uint8, device=device)
    best = math.inf
    for _ in range(3):
        torch.cuda.synchronize(device)
        began = time.perf_counter()
        for i in range(count):
            dst[i].copy_(src[i], non_blocking=True)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - began)
    return count * _LINK_CHUNK / best / 1e9


def link_chunks(room: int | None) -> int:
    """How many 4 MiB chunks the link probe copies: 16, or as many as ``room`` bytes hold (at least one)."""
    return _LINK_CHUNKS if room is None else max(1, min(_LINK_CHUNKS, room // _LINK_CHUNK))


def probe_device(layout: ExpertLayout, device: torch.device, room: int | None = None) -> float:
    """Seconds of one expert's two matmuls at 1 token on the device, in the compute dtype, best of 5. Where
    the expert's matrices do not fit ``room`` bytes, an expert with fewer intermediate rows is timed and its
    time scaled up by the bytes: at one token the matmuls read their weights, so time follows bytes."""
    inter = probe_intermediate(layout, room)
    per_row = layout.gate_up_rows // layout.intermediate_size  # gate and up rows per intermediate row
    dtype, hidden = layout.dtype, layout.hidden_size  # drawn in the compute dtype: no fp32 temporaries
    gate_up = torch.randn(per_row * inter, hidden, device=device, dtype=dtype)
    down = torch.randn(hidden, inter, device=device, dtype=dtype)
    x = torch.randn(1, hidden, device=device, dtype=dtype)
    best = math.inf
    for _ in range(6):
        torch.cuda.synchronize(device)
        began = time.perf_counter()
        h = torch.nn.functional.linear(x, gate_up)[:, :inter]
        torch.nn.functional.linear(h, down)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - began)
    return best * layout.intermediate_size / inter


def probe_intermediate(layout: ExpertLayout, room: int | None) -> int:
    """The intermediate size the device probe times: the expert's own, or as much of it as ``room`` holds."""
    if room is None:
        return layout.intermediate_size
    itemsize = torch.empty((), dtype=layout.dtype).element_size()
    per_row = layout.gate_up_rows // layout.intermediate_size  # gate and up rows per intermediate row
    per_inter = (per_row + 1) * layout.hidden_size * itemsize  # its gate/up rows and its column of down
    rows = (room - 4 * layout.hidden_size * itemsize) // per_inter  # less the input and outputs
    return max(1, min(layout.intermediate_size, rows))


# -- the cache file ----------------------------------------------------------------------------------------


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, data: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".rates.", dir=path.parent)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: measure again next time
