"""Plan, then execute: the cache decides (pure Python), the copy engine moves bytes and waits.

``plan()`` is the cache's decision for one layer access and has no side effects on tensors, so it can be
logged and asserted on; ``execute()`` only issues the copies a wave needs and makes compute wait for them.
"""

from __future__ import annotations

from typing import Any

from cache_policies import (
    AccessPlan,
    AccessSequence,
    ExpertCache,
    Prefetch,
    TraceError,
    Wave,
    expert_counts,
    load_trace,
    make_policy_factory,
)
from cache_policies.cache import PolicyFactory
from offload.config import OffloadConfig
from offload.errors import OffloadError
from offload.store import HostExpertStore
from offload.transport import CopyEngine


def policy_factory(config: OffloadConfig, num_layers: int, num_experts: int, top_k: int) -> PolicyFactory:
    """The cache policy the config names, with the options it needs filled in from the config and model."""
    options: dict[str, Any] = dict(config.policy_options)
    if config.policy == "random":
        options.setdefault("seed", config.seed)
    if config.policy == "static":
        if config.static_profile is None:
            raise OffloadError(
                "policy 'static' pins the experts a profiling run used most: pass static_profile=<trace file> "
                "(offload-run --static-profile; record one with --record-trace)"
            )
        try:
            counts = expert_counts(AccessSequence.from_trace(load_trace(config.static_profile)))
        except (TraceError, OSError) as exc:
            raise OffloadError(f"static profile: {exc}") from None
        if counts.shape != (num_layers, num_experts):
            raise OffloadError(
                f"static profile {config.static_profile} has {counts.shape[0]} layers x {counts.shape[1]} experts; "
                f"this model has {num_layers} x {num_experts}"
            )
        # Top-k dynamic slots: one token's experts fit without unpinning anything (as the simulator does).
        options.update(profile=counts, dynamic_slots=top_k, scope=config.cache_scope)
    try:
        return make_policy_factory(config.policy, **options)
    except ValueError as exc:
        raise OffloadError(str(exc)) from None


class Scheduler:
    def __init__(self, cache: ExpertCache, store: HostExpertStore, engine: CopyEngine) -> None:
        self.cache = cache
        self.store = store
        self.engine = engine
        self.waves = 0

    def plan(self, layer: int, experts: list[int]) -> AccessPlan:
        """Hits, misses, victims and slots for ``experts`` (ascending) of MoE layer ``layer``."""
        return self.cache.access(layer, experts)

    def execute(self, layer: int, wave: Wave, prefetch: Prefetch | None = None) -> None:
        """Copy the wave's misses into their slots, then any prefetch (it lands while this wave computes),
        and make compute wait for exactly the wave's slots."""
        loads = [(wave.slots[i], self.store.expert(layer, wave.experts[i])) for i in wave.loads]
        if prefetch is not None:
            loads += [
                (s, self.store.expert(prefetch.layer, e))
                for e, s in zip(prefetch.experts, prefetch.slots, strict=True)
            ]
        self.engine.load(loads)
        self.engine.acquire(wave.slots)
        self.waves += 1

    def finish(self, wave: Wave) -> None:
        """Compute has issued every read of the wave's slots."""
        self.engine.release(wave.slots)
