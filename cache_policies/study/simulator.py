"""Replay a routing trace through an expert cache and count what the runtime would have done.

The simulator drives the same :class:`ExpertCache` the runtime drives, with the same layer accesses in the
same order (see :mod:`cache_policies.study.access`), so its hits and misses are the runtime's (invariant
*same-decisions*, docs/architecture.md). LRU without prefetch takes a counting-only fast path with identical
decisions (:mod:`cache_policies.study.fast_lru`).

Prefetch (``prefetch="history"``) runs the runtime's own protocol (:class:`cache_policies.prefetch.Prefetcher`)
with a :class:`HistoryPredictor` of ``history_window`` accesses, so a recorded run replays with the same
decisions: after each single-wave access, the next MoE layer's (after the last layer, the next token's layer
0) most used experts are prefetched; after a multi-wave access (a prefill step with more experts than slots),
the next layer's most used experts (all of them where it has no history yet), behind the last wave, never
past the last layer.

``misses`` stay demand misses; prefetch copies are counted apart (``prefetch_issued``, of which
``prefetch_hits`` were then found resident by a demand access and ``prefetch_wasted`` were evicted unused; the
rest are still resident and unused at the end), and ``bytes_moved`` is demand plus prefetch bytes.
``prefetch="lookahead"`` needs hidden states and the next layer's router: it runs only in the runtime.

Timing model (optional, :class:`TimingModel`): one host-to-device link and one compute stream. With ``c`` =
``compute_s_per_layer`` and ``t = expert_bytes / (bandwidth_gbps x 1e9)`` the time of one expert copy:

- The link serves copies one at a time in the order they were issued (a single FIFO copy queue, no
  priorities, no preemption); ``link_free`` is when it finishes the last copy issued so far.
- Layer access ``i`` starts when the previous one has finished computing, at ``T_i``. Its ``m_i`` demand
  copies are issued at ``T_i`` and queue behind whatever is still in flight: they land at
  ``max(T_i, link_free) + m_i x t``. Its compute starts at ``S_i`` = when the last copy it reads has landed:
  its demand copies, and any prefetched expert it uses whose copy is still in flight (that use is counted
  in ``prefetch_late``). Prefetched experts it does not use are not waited for.
- The prefetch issued at access ``i`` (for layer ``i + 1``) is queued at ``T_i`` right behind the demand
  copies, so it runs while layer ``i`` computes; what does not fit in ``c`` delays the next access only
  when that access reads a late expert or has demand copies of its own that queue behind it.
- Access ``i`` ends at ``S_i + c``; its *stall* is ``S_i - T_i``. Total time = layer accesses x ``c`` + the
  stalls. Decode tokens/s = tokens / total time, stall fraction = stalls / total time.

Without prefetch nothing is in flight when an access starts, so every access costs ``c + m_i x t``: demand
paging without overlap, what the runtime does without a predictor.

Two tiers (``host_tier=`` host slots per partition): the RAM tier of the disk tier under the device tier, a
second cache fed by the device tier's copies in the runtime's order (:mod:`cache_policies.study.two_tier`);
``SimResult.host_tier`` has its counts and the disk reads of a Belady RAM tier on the same accesses. It counts
and does not time: no timing model with it.

Host compute (``host=``, a :class:`CopyOrCompute` rule): the rule picks, per access, misses to compute on the
host instead of copying (they are not admitted; the policy sees the use). The host starts them at ``T_i``, on
worker threads beside the link and the device, and they take ``H_i`` = the rule's host time: access ``i`` ends
at ``max(S_i + c, T_i + H_i)``, and its stall is that end minus ``T_i + c``. ``host_computed`` counts them. A multi-wave access is charged the same
way (all its copies, then ``c``). ``c`` is everything one layer access costs besides expert copies
(attention, router, expert matmuls), per step: for a decode trace, per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from cache_policies.cache import ExpertCache, HostChoice, PolicyFactory, Scope
from cache_policies.copy_or_compute import CopyOrCompute
from cache_policies.predictors import PREFETCH_MODES, HistoryPredictor
from cache_policies.prefetch import Prefetcher
from cache_policies.registry import POLICIES, make_policy_factory
from cache_policies.study.access import AccessSequence, expert_counts
from cache_policies.study.fast_lru import replay_lru
from cache_policies.study.trace import RoutingTrace
from cache_policies.study.two_tier import HostTierResult, HostTierSim

SimPrefetch = Literal["none", "history"]
SIM_PREFETCH_MODES: tuple[SimPrefetch, ...] = ("none", "history")  # lookahead, pre-attention: runtime only


def check_prefetch(mode: str) -> SimPrefetch:
    """``mode`` if the simulator can replay it; a clear ValueError otherwise."""
    for known in SIM_PREFETCH_MODES:
        if mode == known:
            return known
    if mode in ("lookahead", "pre-attention"):
        raise ValueError(
            f"prefetch {mode!r} needs hidden states and the model's routers: it runs only in the runtime; a "
            "routing trace can replay prefetch 'none' or 'history'"
        )
    raise ValueError(f"unknown prefetch mode {mode!r}; choose one of: {', '.join(PREFETCH_MODES)}")


@dataclass(frozen=True)
class TimingModel:
    """One copy link and one compute stream: see the module docstring for the exact model."""

    bandwidth_gbps: float  # host -> device copy bandwidth, 1 GB = 1e9 bytes
    compute_s_per_layer: float  # seconds per layer access besides expert copies

    def __post_init__(self) -> None:
        if not (self.bandwidth_gbps > 0 and math.isfinite(self.bandwidth_gbps)):
            raise ValueError(f"copy bandwidth must be a positive number of GB/s, got {self.bandwidth_gbps}")
        if not (self.compute_s_per_layer >= 0 and math.isfinite(self.compute_s_per_layer)):
            raise ValueError(f"per-layer compute time must be >= 0 seconds, got {self.compute_s_per_layer}")

    def copy_seconds(self, expert_bytes: int) -> float:
        """Time of one expert copy over the link."""
        return expert_bytes / (self.bandwidth_gbps * 1e9)


class CopyTimeline:
    """The timing model run access by access: a FIFO copy queue on one link beside one compute stream.

    Call :meth:`access` for every layer access (its demand misses and the keys of the prefetched experts it
    used), then :meth:`prefetch` with the keys that access's prefetch copied in. :meth:`landed` tells, before
    an access, whether a prefetched key's copy has landed by the time it starts.
    """

    def __init__(self, timing: TimingModel, expert_bytes: int) -> None:
        self.copy_s = timing.copy_seconds(expert_bytes)
        self.compute_s = timing.compute_s_per_layer
        self.clock = 0.0  # when the running access started (T_i); after it, when the next one may start
        self.link_free = 0.0  # when the link has landed every copy issued so far
        self.stall_seconds = 0.0
        self._started = 0.0
        self._landing: dict[int, float] = {}  # prefetched key -> when its copy lands

    def landed(self, key: int) -> bool:
        """Whether the prefetch copy of ``key`` lands by the time the next access starts."""
        return self._landing[key] <= self.clock

    def access(self, misses: int, used_prefetched: list[int], host_s: float = 0.0) -> None:
        """``host_s``: seconds of the access's experts computed on the host, beside the link and compute."""
        start = self._started = self.clock
        ready = start
        if misses:
            self.link_free = max(start, self.link_free) + misses * self.copy_s
            ready = self.link_free
        for key in used_prefetched:
            ready = max(ready, self._landing.pop(key))
        end = max(ready + self.compute_s, start + host_s)
        self.stall_seconds += end - start - self.compute_s
        self.clock = end

    def prefetch(self, keys: list[int]) -> None:
        """Copies issued at the start of the access just timed, behind its demand copies."""
        t = max(self._started, self.link_free)
        landing = self._landing
        for key in keys:
            t += self.copy_s
            landing[key] = t  # a key prefetched again (after a wasted prefetch) gets its new landing time
        self.link_free = t


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
    hits: int  # demand hits, prefetched experts found resident included
    misses: int  # demand misses only
    evictions: int  # by demand loads and prefetches
    expert_bytes: int | None
    seconds: float | None = None  # simulated time (with a timing model)
    stall_seconds: float | None = None
    prefetch: SimPrefetch = "none"
    history_window: int | None = None  # of the history predictor; None without prefetch
    prefetch_issued: int = 0  # experts copied in by prefetches
    prefetch_hits: int = 0  # of those, found resident by a demand access of their layer
    prefetch_wasted: int = 0  # of those, evicted before any demand access used them
    prefetch_late: int | None = None  # prefetch hits whose copy had not landed (timing model only)
    host_computed: int = 0  # misses computed on the host instead of copied (not in ``misses``)
    host: str = "off"  # the copy-or-compute mode
    host_tier: HostTierResult | None = None  # the RAM tier under the device tier, when simulated

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    @property
    def copied(self) -> int:
        """Misses copied into a slot: the demand misses (host-computed ones are apart)."""
        return self.misses

    @property
    def label(self) -> str:
        """The policy, with ``+history`` when a predictor prefetched for it, ``+host`` when misses could be
        computed on the host."""
        label = self.policy if self.prefetch == "none" else f"{self.policy}+{self.prefetch}"
        return label if self.host == "off" else f"{label}+host"

    @property
    def demand_bytes(self) -> int | None:
        """Host-to-device bytes for the demand misses; None when the expert size is unknown."""
        return None if self.expert_bytes is None else self.misses * self.expert_bytes

    @property
    def prefetch_bytes(self) -> int | None:
        return None if self.expert_bytes is None else self.prefetch_issued * self.expert_bytes

    @property
    def bytes_moved(self) -> int | None:
        """All host-to-device bytes: demand misses plus prefetch copies; None when the expert size is unknown."""
        if self.expert_bytes is None:
            return None
        return (self.misses + self.prefetch_issued) * self.expert_bytes

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
    prefetch: str = "none",
    history_window: int = 8,
    host: CopyOrCompute | None = None,
    host_tier: int | None = None,
    host_tier_policy: str | None = None,
    disk_read_ahead: bool = False,
) -> SimResult:
    """Replay ``trace`` through ``policy`` with ``capacity`` slots per partition (see :class:`ExpertCache`).

    ``expert_bytes`` overrides the trace's; a timing model needs one of them. ``fast=False`` forces the
    generic ``ExpertCache`` path for LRU too (prefetch always takes it). ``prefetch``: ``"none"`` (demand
    paging) or ``"history"`` (a :class:`HistoryPredictor` over the last ``history_window`` accesses of each
    layer, by the protocol in the module docstring); ``"lookahead"`` raises ValueError (runtime only).
    Belady with prefetch is Belady's eviction plus history prefetch, not a bound: the demand-paging bound is
    Belady without prefetch, and a prefetching policy can beat it. ``host``: the copy-or-compute rule (module
    docstring); ``"auto"`` with a timing model needs rates whose link rate is the timing model's.
    ``host_tier``: host slots per partition of a RAM tier under the device tier (the disk tier), with
    ``host_tier_policy`` (default: ``policy``; not belady, whose future is the device tier's);
    ``disk_read_ahead``: guesses start reads for experts not in RAM (offload's ``disk_read_ahead``).
    """
    mode = check_prefetch(prefetch)
    seq = trace if isinstance(trace, AccessSequence) else AccessSequence.from_trace(trace)
    if expert_bytes is None and isinstance(trace, RoutingTrace):
        expert_bytes = trace.expert_bytes
    if policy not in POLICIES:
        raise ValueError(f"unknown cache policy {policy!r}; choose one of: {', '.join(POLICIES)}")
    if timing is not None and expert_bytes is None:
        raise ValueError("the timing model needs the expert size: the trace does not say, pass expert_bytes")
    predictor = HistoryPredictor(seq.num_layers, history_window) if mode == "history" else None
    timeline = None
    prefetcher = None
    hosting = host is not None and host.mode != "off"
    tier = None
    if host_tier is not None:
        if timing is not None:
            raise ValueError(
                "a RAM tier under the device tier is counted, not timed: no timing model with it"
            )
        tier_policy = host_tier_policy or policy
        if tier_policy == "belady":
            raise ValueError("the RAM tier's policy must be an online one (its Belady figure comes with it)")
        factory = policy_factory_for(tier_policy, seq, scope, options if tier_policy == policy else None)
        tier = HostTierSim.build(seq.num_layers, seq.num_experts, host_tier, factory, scope)
    if policy == "lru" and fast and not options and predictor is None and not hosting and tier is None:
        misses_per_access, evictions, _ = replay_lru(seq, capacity, scope)
        misses = sum(misses_per_access)
        capacity = min(capacity, seq.num_experts * (1 if scope == "layer" else seq.num_layers))
        slots = capacity * (seq.num_layers if scope == "layer" else 1)
    else:
        cache = ExpertCache(
            seq.num_layers, seq.num_experts, capacity, policy_factory_for(policy, seq, scope, options), scope
        )
        if predictor is None and not hosting and tier is None:
            access = cache.access
            for layer, experts in zip(seq.layers, seq.experts, strict=True):
                access(layer, experts)
        else:
            if timing is not None and expert_bytes is not None:
                timeline = CopyTimeline(timing, expert_bytes)
            if predictor is not None:
                prefetcher = Prefetcher(cache, predictor, seq.top_k, lower=tier, reads_ahead=disk_read_ahead)
            _replay(seq, cache, prefetcher, timeline, host if hosting else None, tier)
        misses, evictions, capacity, slots = cache.misses, cache.evictions, cache.capacity, cache.slots
    accesses = seq.expert_accesses
    seconds = stall = None
    if timeline is not None:
        stall = timeline.stall_seconds
        seconds = seq.num_accesses * timeline.compute_s + stall
    elif timing is not None and expert_bytes is not None:
        stall = misses * timing.copy_seconds(expert_bytes)
        seconds = seq.num_accesses * timing.compute_s_per_layer + stall
    counters: dict[str, Any] = {}
    if prefetcher is not None:
        counters = {
            "prefetch": mode,
            "history_window": history_window,
            "prefetch_issued": prefetcher.issued,
            "prefetch_hits": prefetcher.cache.prefetch_hits,
            "prefetch_wasted": prefetcher.wasted,
            "prefetch_late": None if timeline is None else prefetcher.late,
        }
    if hosting:
        assert host is not None
        counters.update(host_computed=cache.host_computed, host=host.mode)
    if tier is not None:
        counters["host_tier"] = tier.result(expert_bytes)
    return SimResult(
        policy=policy,
        scope=scope,
        capacity=capacity,
        slots=slots,
        steps=len(seq.tokens_per_step),
        tokens=sum(seq.tokens_per_step),
        layer_accesses=seq.num_accesses,
        accesses=accesses,
        hits=accesses - misses - counters.get("host_computed", 0),
        misses=misses,
        evictions=evictions,
        expert_bytes=expert_bytes,
        seconds=seconds,
        stall_seconds=stall,
        **counters,
    )


def _replay(
    seq: AccessSequence,
    cache: ExpertCache,
    prefetcher: Prefetcher | None,
    timeline: CopyTimeline | None,
    host: CopyOrCompute | None,
    tier: HostTierSim | None = None,
) -> None:
    """The runtime's order per access (:mod:`cache_policies.prefetch`): access (with the copy-or-compute rule),
    settle the prefetched experts it found, time it, prefetch for a coming layer; the timing model beside it;
    and under it the RAM tier, as :mod:`cache_policies.study.two_tier` says."""
    num_experts = seq.num_experts
    for i, (layer, experts) in enumerate(zip(seq.layers, seq.experts, strict=True)):
        choice: HostChoice | None = None
        tokens: dict[int, int] = {}
        if host is not None:
            tokens = dict(zip(experts, seq.tokens_of(i), strict=True))

            def choice(missing: list[int], hits: int, layer: int = layer) -> list[int]:
                if tier is not None:  # host compute takes only experts in RAM
                    missing = [e for e in missing if tier.ready(layer, e)]
                return host.choose(missing, [tokens[e] for e in missing], hits)  # noqa: B023

        plan = cache.access(layer, experts, choice)
        if tier is not None:
            tier.serve(layer, experts, plan, prefetcher)
            continue
        base = layer * num_experts
        if timeline is not None:
            host_s = 0.0
            if plan.host and host is not None:
                host_s = sum(host.host_s(tokens[e]) for e in plan.host)
            if prefetcher is not None:
                landed = timeline.landed
                prefetcher.settle(plan, lambda e: landed(base + e))  # noqa: B023 - called right here
            timeline.access(plan.misses, [base + e for e in plan.prefetched], host_s)
        if prefetcher is not None:
            issued = prefetcher.after_access(layer, experts, plan)
            if timeline is not None and issued is not None:
                timeline.prefetch([issued.layer * num_experts + e for e in issued.experts])
