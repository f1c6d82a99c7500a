"""Replay a routing trace through an expert cache and count what the runtime would have done.

The simulator drives the same :class:`ExpertCache` the runtime drives, with the same layer accesses in the
same order (see :mod:`cache_policies.access`), so its hits and misses are the runtime's (DESIGN invariant 4).
LRU takes a counting-only fast path with identical decisions (:mod:`cache_policies.fast_lru`).

Timing model (optional, :class:`TimingModel`): *demand paging without overlap*, which is what the runtime
does today: a layer cannot compute before its missing experts have been copied, and nothing is copied
ahead of need, so every layer access costs

    compute_s_per_layer + misses x expert_bytes / (bandwidth_gbps x 1e9)

The copy part is the *stall*. Decode tokens/s = tokens / total time, stall fraction = copy time / total
time. ``compute_s_per_layer`` is everything one layer access costs besides expert copies (attention, router,
expert matmuls), per step: for a decode trace, per token. Prefetching (a later issue) will overlap copies
with the compute of earlier layers; only then does a max(compute, copy) term appear.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from cache_policies.access import AccessSequence, expert_counts
from cache_policies.cache import ExpertCache, PolicyFactory, Scope
from cache_policies.fast_lru import replay_lru
from cache_policies.registry import POLICIES, make_policy_factory
from cache_policies.trace import RoutingTrace


@dataclass(frozen=True)
class TimingModel:
    bandwidth_gbps: float  # host -> device copy bandwidth, 1 GB = 1e9 bytes
    compute_s_per_layer: float  # seconds per layer access besides expert copies

    def __post_init__(self) -> None:
        if not (self.bandwidth_gbps > 0 and math.isfinite(self.bandwidth_gbps)):
            raise ValueError(f"copy bandwidth must be a positive number of GB/s, got {self.bandwidth_gbps}")
        if not (self.compute_s_per_layer >= 0 and math.isfinite(self.compute_s_per_layer)):
            raise ValueError(f"per-layer compute time must be >= 0 seconds, got {self.compute_s_per_layer}")


@dataclass(frozen=True)
class SimResult:
    policy: str
    scope: Scope
    capacity: int  # slots of one partition: per layer for scope "layer", all of them for "global"
    slots: int  # slots in total
    steps: int
    tokens: int
    layer_accesses: int
    accesses: int  # expert accesses: distinct experts per layer access, summed
    hits: int
    misses: int
    evictions: int
    expert_bytes: int | None
    seconds: float | None = None  # simulated time (with a timing model)
    stall_seconds: float | None = None

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    @property
    def bytes_moved(self) -> int | None:
        """Host-to-device bytes for the misses; None when the expert size is unknown."""
        return None if self.expert_bytes is None else self.misses * self.expert_bytes

    @property
    def tokens_per_s(self) -> float | None:
        if self.seconds is None:
            return None
        return self.tokens / self.seconds if self.seconds > 0 else math.inf

    @property
    def stall_fraction(self) -> float | None:
        if self.seconds is None or self.stall_seconds is None:
            return None
        return self.stall_seconds / self.seconds if self.seconds > 0 else 0.0


def policy_factory_for(
    name: str, seq: AccessSequence, scope: Scope, options: dict[str, Any] | None = None
) -> PolicyFactory:
    """The factory for ``name`` with the options the simulator can fill in from the trace itself.

    static: ``profile`` defaults to this trace's own expert counts (an optimistic, self-profiled static;
    pass a profile from another trace for an honest one) and ``dynamic_slots`` to the trace's top-k.
    belady: ``future`` is this trace's future.
    """
    options = dict(options or {})
    if name == "static":
        options.setdefault("profile", expert_counts(seq))
        options.setdefault("dynamic_slots", seq.top_k)
        options.setdefault("scope", scope)
    elif name == "belady":
        options.setdefault("future", seq.future)
    return make_policy_factory(name, **options)


def simulate(
    trace: RoutingTrace | AccessSequence,
    policy: str,
    capacity: int,
    scope: Scope = "layer",
    *,
    options: dict[str, Any] | None = None,
    timing: TimingModel | None = None,
    expert_bytes: int | None = None,
    fast: bool = True,
) -> SimResult:
    """Replay ``trace`` through ``policy`` with ``capacity`` slots per partition (see :class:`ExpertCache`).

    ``expert_bytes`` overrides the trace's; a timing model needs one of them. ``fast=False`` forces the
    generic ``ExpertCache`` path for LRU too.
    """
    seq = trace if isinstance(trace, AccessSequence) else AccessSequence.from_trace(trace)
    if expert_bytes is None and isinstance(trace, RoutingTrace):
        expert_bytes = trace.expert_bytes
    if policy not in POLICIES:
        raise ValueError(f"unknown cache policy {policy!r}; choose one of: {', '.join(POLICIES)}")
    if timing is not None and expert_bytes is None:
        raise ValueError("the timing model needs the expert size: the trace does not say, pass expert_bytes")
    if policy == "lru" and fast and not options:
        misses_per_access, evictions, _ = replay_lru(seq, capacity, scope)
        misses = sum(misses_per_access)
        capacity = min(capacity, seq.num_experts * (1 if scope == "layer" else seq.num_layers))
        slots = capacity * (seq.num_layers if scope == "layer" else 1)
    else:
        cache = ExpertCache(
            seq.num_layers, seq.num_experts, capacity, policy_factory_for(policy, seq, scope, options), scope
        )
        access = cache.access
        for layer, experts in zip(seq.layers, seq.experts, strict=True):
            access(layer, experts)
        misses, evictions, capacity, slots = cache.misses, cache.evictions, cache.capacity, cache.slots
    accesses = seq.expert_accesses
    seconds = stall = None
    if timing is not None and expert_bytes is not None:
        stall = misses * expert_bytes / (timing.bandwidth_gbps * 1e9)
        seconds = seq.num_accesses * timing.compute_s_per_layer + stall
    return SimResult(
        policy=policy,
        scope=scope,
        capacity=capacity,
        slots=slots,
        steps=len(seq.tokens_per_step),
        tokens=sum(seq.tokens_per_step),
        layer_accesses=seq.num_accesses,
        accesses=accesses,
        hits=accesses - misses,
        misses=misses,
        evictions=evictions,
        expert_bytes=expert_bytes,
        seconds=seconds,
        stall_seconds=stall,
    )
