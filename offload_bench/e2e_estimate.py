"""How long one row of the end-to-end benchmark will take, before it runs: so a run under a time limit (the GPU
check's ``e2e`` stage) prints each row's estimate first and skips a row that would not finish, instead of being
stopped in the middle of it.

Building dominates: a random model's experts are written once into fresh host memory (pinned, on a GPU) and a
plain model's weights into fresh pageable memory, at rates this very machine shows in a quick calibration
(:func:`measure_host_rates`: the same kind of buffer, written the same way). Running is estimated from the
copies a decode token makes at the measured host-to-device peak (random routing with an LRU cache hits about
the share of experts in slots) plus a per-layer overhead, and the first use of each expert format pays
kernel compiles and host compute's probes. The constants below are stated assumptions, not measurements; a
row's record keeps its estimate beside what it took (``wall_s``), so each run shows how far off they were.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

GB = 1e9
FIXED_BUILD_S = 2.0  # meta model, survey, the expert bank's draw: measured 1-2 s on a 2-core VM
LAYER_OVERHEAD_S = {"cuda": 2e-3, "cpu": 5e-3}  # per MoE layer call besides copies: launches, Python, routing
# An expert format's first row in the process: Triton compiles, and host compute's probes at load (once per
# machine and expert shape, then cached)
COMPILE_S = {"cuda": 10.0, "cpu": 1.0}
# The disk tier's rows (int4-disk): the store written once at build, reads of the RAM tier's misses at run
DISK_WRITE_BYTES_PER_S = 1e9
DISK_READ_BYTES_PER_S = 2e9
ACCELERATE_LAYER_S = 5e-3  # per decoder layer of accelerate's forward besides its copies: hooks, launches
CALIBRATION_BYTES = 256 << 20


@dataclass(frozen=True)
class HostRates:
    """Bytes per second of what building and running a row does, measured on this machine."""

    store_fill: float  # fresh host-store memory (registered on a GPU) written from a warm source
    plain_fill: float  # fresh pageable memory (torch's allocator) written from a warm source
    h2d: float  # the pinned host-to-device peak (a host memcpy on a CPU)
    pageable_h2d: float  # the same from pageable memory: what accelerate's hooks copy at

    def as_dict(self) -> dict[str, float]:
        return {k: round(v / GB, 3) for k, v in asdict(self).items()}


def measure_host_rates(device: torch.device, peak: dict[str, Any]) -> HostRates:
    """A quick calibration (well under a second): one host-store buffer and one torch buffer of 256 MiB, each
    fresh, written from a warm source; ``peak`` is :func:`offload_bench.machine.measure_h2d_peak`'s answer."""
    import torch

    from offload.memory.host_memory import host_buffer, unpin

    source = torch.ones(CALIBRATION_BYTES, dtype=torch.uint8)

    def timed(make: Any) -> float:
        began = time.perf_counter()
        buffer = make()
        buffer.copy_(source)
        seconds = time.perf_counter() - began
        unpin(buffer)
        return CALIBRATION_BYTES / seconds

    store = timed(lambda: host_buffer(CALIBRATION_BYTES, pin=device.type == "cuda")[0])
    plain = timed(lambda: torch.empty(CALIBRATION_BYTES, dtype=torch.uint8))
    h2d = float(peak["bytes_per_s"])
    return HostRates(store, plain, h2d, float(peak.get("pageable_bytes_per_s") or h2d))


def decode_misses_per_token(survey: Any, slots: int) -> float:
    """Expert copies per decode token under random routing and an LRU cache: every use misses with about the
    probability that its expert is not among the slots."""
    return survey.num_layers * survey.top_k * (1.0 - min(1.0, slots / survey.total_experts))


def prefill_copies(survey: Any, slots: int, tokens: int) -> float:
    """Expert copies of one prefill: the distinct experts ``tokens`` random top-k choices touch per layer,
    those not already resident."""
    e, k = survey.num_experts, survey.top_k
    touched = e * (1.0 - (1.0 - k / e) ** tokens)
    return survey.num_layers * touched * (1.0 - min(1.0, slots / survey.total_experts))


def estimate_offloaded(
    survey: Any, slots: int, args: Any, rates: HostRates, device: torch.device, compiles: bool
) -> dict[str, float]:
    """Build and run seconds of one offloaded row: ``survey`` in the row's own expert format, ``slots`` its
    plan's; ``compiles`` when the row is the first of its format in this process."""
    store_bytes = survey.total_experts * survey.layout.nbytes
    resident_on_host = survey.resident_bytes if device.type == "cpu" else 0
    build = FIXED_BUILD_S + store_bytes / rates.store_fill + resident_on_host / rates.plain_fill
    per_token = (
        decode_misses_per_token(survey, slots) * survey.layout.nbytes / rates.h2d
        + survey.num_layers * LAYER_OVERHEAD_S[device.type]
    )
    prefill = (
        prefill_copies(survey, slots, args.prompt_tokens) * survey.layout.nbytes / rates.h2d
        + survey.num_layers * LAYER_OVERHEAD_S[device.type]
    )
    tokens = 2 * args.warmup_tokens + args.decode_tokens  # the throwaway pass's and the timed pass's
    run = 2 * prefill + tokens * per_token + (COMPILE_S[device.type] if compiles else 0.0)
    return _seconds(build, run)


def estimate_accelerate(
    survey: Any, cap: int, args: Any, rates: HostRates, device: torch.device
) -> dict[str, float]:
    """Build and run seconds of accelerate's row: the whole model written to pageable memory, then every
    forward copying what does not fit the cap from pageable memory (on a CPU: built only)."""
    model_bytes = survey.resident_bytes + survey.total_experts * survey.layout.nbytes
    build = FIXED_BUILD_S + model_bytes / rates.plain_fill
    run = 0.0
    if device.type == "cuda":
        warmup = min(args.warmup_tokens, 1)
        forwards = 2 * (1 + warmup) + args.accelerate_decode_tokens
        per_forward = max(0, model_bytes - cap) / rates.pageable_h2d + survey.num_layers * ACCELERATE_LAYER_S
        run = forwards * per_forward
    return _seconds(build, run)


def _seconds(build: float, run: float) -> dict[str, float]:
    build, run = round(build, 1), round(run, 1)
    return dict(build_s=build, run_s=run, total_s=round(build + run, 1))


def estimate_row(variant: str, args: Any, ctx: dict[str, Any], env: dict[str, Any]) -> dict[str, Any]:
    """One row's estimated build and run seconds, from its own plan (offload_bench.e2e's ``ctx`` and
    ``env``); an offloaded row's also names its expert format."""
    from offload.hf.expert_formats import with_format
    from offload.runtime.budget import plan_budget
    from offload_bench.e2e_runs import offloaded_config

    device, rates = env["estimated_device"], env["rates"]
    if variant == "accelerate":
        return estimate_accelerate(ctx["survey"], ctx["budget"], args, rates, device)
    config = offloaded_config(variant, args, ctx)
    survey = with_format(ctx["survey"], config, None)
    slots = plan_budget(survey, config).slots
    compiles = survey.layout.format_name not in env["compiled"]
    estimate = estimate_offloaded(survey, slots, args, rates, device, compiles)
    if config.disk_tier == "always":
        estimate = _with_disk(estimate, survey, slots, config, args)
    return dict(estimate, format=survey.layout.format_name)


def _with_disk(
    estimate: dict[str, float], survey: Any, slots: int, config: Any, args: Any
) -> dict[str, float]:
    """A disk-tier row: writing the store at build; at run, reading what the RAM tier misses (random routing:
    it holds about its share of the experts) at assumed drive rates."""
    from offload.memory.disk_store import row_stride
    from offload.runtime.host_plan import check_host_memory

    plan = check_host_memory(survey, config, 0)
    stride = row_stride(survey.layout)
    ram_share = (plan.host_tier_slots or 0) / survey.total_experts
    tokens = 2 * args.warmup_tokens + args.decode_tokens
    reads = 2 * prefill_copies(survey, slots, args.prompt_tokens) + tokens * decode_misses_per_token(
        survey, slots
    )
    build = estimate["build_s"] + survey.total_experts * stride / DISK_WRITE_BYTES_PER_S
    run = estimate["run_s"] + reads * (1 - ram_share) * stride / DISK_READ_BYTES_PER_S
    return _seconds(build, run)
