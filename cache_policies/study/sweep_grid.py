"""The grid of a sweep: every policy x cache size x scope on each trace, Belady beside each cell."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cache_policies.cache import Scope
from cache_policies.copy_or_compute import CopyOrCompute, HostRates
from cache_policies.study.access import AccessSequence
from cache_policies.study.importers import load_trace
from cache_policies.study.simulator import SimPrefetch, SimResult, TimingModel, simulate
from cache_policies.study.trace import RoutingTrace


class CapacityError(ValueError):
    """A cache fraction that leaves no slot for a trace's experts."""


@dataclass(frozen=True)
class SweepRow:
    trace: str
    fraction: float
    result: SimResult
    belady: SimResult  # the demand-paging bound at the same trace, scope and capacity (never prefetches)
    host_fraction: float | None = None  # the RAM tier under the device tier, as a fraction of the experts

    @property
    def share_of_belady(self) -> float:
        bound = self.belady.hit_rate
        return self.result.hit_rate / bound if bound > 0 else math.nan


@dataclass(frozen=True)
class LoadedTrace:
    label: str  # the name in the csv: the file name without its extension
    trace: RoutingTrace
    seq: AccessSequence


def layer_slots(fraction: float, num_experts: int) -> int:
    """round(fraction x experts), halves up (Python's round() would send 2.5 to 2)."""
    return math.floor(fraction * num_experts + 0.5)


def load_traces(paths: Sequence[str], expert_bytes: int | None = None) -> list[LoadedTrace]:
    loaded: list[LoadedTrace] = []
    for path in paths:
        trace = load_trace(path, expert_bytes=expert_bytes)
        label = Path(path).stem
        if any(t.label == label for t in loaded):
            label = f"{label}-{len(loaded)}"
        loaded.append(LoadedTrace(label, trace, AccessSequence.from_trace(trace)))
    return loaded


def check_capacities(t: LoadedTrace, fractions: Sequence[float]) -> None:
    for fraction in fractions:
        if layer_slots(fraction, t.trace.num_experts) < 1:
            raise CapacityError(
                f"cache fraction {fraction} gives no slot for the {t.trace.num_experts} experts of {t.label}"
            )


def sweep(
    traces: Sequence[LoadedTrace],
    policies: Sequence[str],
    fractions: Sequence[float],
    scopes: Sequence[Scope],
    *,
    seed: int = 0,
    half_life: float = 256.0,
    static_profile: np.ndarray | None = None,
    timing: TimingModel | None = None,
    prefetch: Sequence[SimPrefetch] = ("none",),
    history_window: int = 8,
    host_gbps: float | None = None,
    host_fractions: Sequence[float] = (),
) -> list[SweepRow]:
    """Rows per trace, scope and fraction: every policy for each prefetch mode in turn, Belady once (without
    prefetch, as the bound). With ``host_gbps`` (and a timing model) every online policy runs a second time
    with the copy-or-compute rule ``auto`` at that host rate and the timing model's link rate. With
    ``host_fractions``, every online policy (each prefetch mode, no host compute) also runs over a RAM tier
    holding that fraction of the experts (the disk tier; counted, not timed), with the same policy."""
    rows: list[SweepRow] = []
    for t in traces:
        for scope in scopes:
            for fraction in fractions:
                slots = layer_slots(fraction, t.trace.num_experts)
                capacity = slots if scope == "layer" else slots * t.trace.num_layers
                results: dict[tuple[str, str, str], SimResult] = {}
                hosts = ["off"] if host_gbps is None else ["off", "auto"]
                runs = [
                    (name, mode, host)
                    for host in hosts
                    for mode in prefetch
                    for name in policies
                    if name != "belady"
                ]
                runs.insert(policies.index("belady"), ("belady", "none", "off"))  # where the user listed it
                for name, mode, host in runs:
                    rule = None
                    if host != "off" and timing is not None and host_gbps is not None:
                        assert t.trace.expert_bytes is not None
                        rule = CopyOrCompute(
                            "auto", t.trace.expert_bytes, HostRates.flat(timing.bandwidth_gbps, host_gbps)
                        )
                    options = _options(name, seed, half_life, static_profile)
                    results[name, mode, host] = simulate(
                        t.seq,
                        name,
                        capacity,
                        scope,
                        options=options or None,
                        timing=timing,
                        expert_bytes=t.trace.expert_bytes,
                        prefetch=mode,
                        history_window=history_window,
                        host=rule,
                    )
                bound = results["belady", "none", "off"]
                rows.extend(SweepRow(t.label, fraction, result, bound) for result in results.values())
                for host_fraction in host_fractions:
                    host_slots = layer_slots(host_fraction, t.trace.num_experts)
                    host_capacity = host_slots if scope == "layer" else host_slots * t.trace.num_layers
                    for name, mode, host in runs:
                        if name == "belady" or host != "off":
                            continue
                        result = simulate(
                            t.seq,
                            name,
                            capacity,
                            scope,
                            options=_options(name, seed, half_life, static_profile) or None,
                            expert_bytes=t.trace.expert_bytes,
                            prefetch=mode,
                            history_window=history_window,
                            host_tier=host_capacity,
                        )
                        rows.append(SweepRow(t.label, fraction, result, bound, host_fraction))
    return rows


def _options(name: str, seed: int, half_life: float, static_profile: np.ndarray | None) -> dict[str, object]:
    """The options a policy takes from the sweep's settings."""
    if name == "random":
        return {"seed": seed}
    if name == "lfru":
        return {"half_life": half_life}
    if name == "static" and static_profile is not None:
        return {"profile": static_profile}
    return {}
