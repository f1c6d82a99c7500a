"""The RAM tier under the device tier, replayed: the disk tier's host slots as a second :class:`ExpertCache`,
fed by the device tier's copies in the runtime's order (``offload/runtime/layer_step.py`` with
``offload/runtime/host_tier.py``), so a recorded run replays with the runtime's counts for both tiers.

Per device access, as the layer step runs it: the experts host compute takes are held (one RAM-tier access);
then per wave, the wave's misses not in RAM start their reads (a reservation in the RAM tier's cache, its
``prefetch``, never evicting what host compute holds), the rest are copied (RAM-tier accesses, at most a
partition's capacity at a time), after the first wave the predictor's guess (under this tier: copies for
the experts in RAM, reads started for the others), and then the wave's experts that were on disk are copied.

In the simulator a read lands at once, so "ready" (in RAM with its read landed) is "resident" here; the
runtime's answer depends on timing when a predictor asks it or host compute weighs experts, so only demand
paging without host compute replays count for count.

The figure beside it: ``belady_disk_reads``, the disk reads of an offline-optimal RAM tier (Belady, demand
paging) of the same size on the same RAM-tier accesses: the device tier's decisions do not depend on the
RAM tier's, so this is the bound for that device tier.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from cache_policies.cache import AccessPlan, ExpertCache, PolicyFactory, Scope
from cache_policies.prefetch import LowerTierCounts, Prefetcher
from cache_policies.registry import make_policy_factory

ALIGN = 4096  # an expert's row on disk is padded to this (offload.memory.disk_store): bytes per read


@dataclass(frozen=True)
class HostTierResult:
    capacity: int  # host slots of one partition: per layer for scope "layer", all of them for "global"
    slots: int
    hits: int  # RAM-tier accesses whose expert was in RAM, no read started for it
    misses: int  # RAM-tier accesses whose expert was read from disk (on demand, or ahead and then used)
    read_ahead: int  # reads started before the copy was issued (a wave's misses, a guess)
    disk_reads: int
    belady_disk_reads: int  # an offline-optimal RAM tier, demand paging, on the same accesses
    expert_bytes: int | None = None

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    @property
    def disk_bytes(self) -> int | None:
        if self.expert_bytes is None:
            return None
        return self.disk_reads * (-(-self.expert_bytes // ALIGN) * ALIGN)


@dataclass
class HostTierSim:
    """The runtime's host tier on the simulator's clock: its cache, and every access made of it."""

    cache: ExpertCache
    held: tuple[int, list[int]] = (0, [])
    accesses: list[tuple[int, list[int]]] = field(default_factory=list)  # (layer, experts), in order

    @classmethod
    def build(
        cls, num_layers: int, num_experts: int, capacity: int, policy: PolicyFactory, scope: Scope
    ) -> HostTierSim:
        return cls(ExpertCache(num_layers, num_experts, capacity, policy, scope))

    # the prefetch protocol's lower tier (cache_policies.prefetch.LowerTier)
    def ready(self, layer: int, expert: int) -> bool:
        return self.cache.slot_of(layer, expert) is not None

    def read_ahead(self, layer: int, experts: Sequence[int]) -> None:
        held_layer, held = self.held
        self.cache.prefetch(layer, experts, running_layer=held_layer, running=held)

    def start_reads(self, layer: int, experts: Sequence[int]) -> list[int]:
        later = [e for e in experts if self.cache.slot_of(layer, e) is None]
        if later:
            self.read_ahead(layer, later)
        return later

    def copy(self, layer: int, experts: Sequence[int]) -> None:
        """The copies of ``experts`` (ascending): their RAM-tier accesses, a partition's capacity at a time."""
        batch = self.cache.capacity
        for start in range(0, len(experts), batch):
            chunk = list(experts[start : start + batch])
            self.cache.access(layer, chunk)
            self.accesses.append((layer, chunk))

    def hold(self, layer: int, experts: Sequence[int]) -> None:
        self.cache.access(layer, experts)
        self.accesses.append((layer, list(experts)))
        self.held = (layer, list(experts))

    def unhold(self) -> None:
        self.held = (0, [])

    def serve(self, layer: int, experts: list[int], plan: AccessPlan, prefetcher: Prefetcher | None) -> None:
        """One device access's copies through this tier, in the layer step's order (module docstring). No
        timing model: the settle step counts nothing late, as without one."""
        if prefetcher is not None:
            prefetcher.settle(plan, None)
        if plan.host:
            self.hold(layer, plan.host)
        for w, wave in enumerate(plan.waves):
            loads = [wave.experts[j] for j in wave.loads]
            later = self.start_reads(layer, loads)
            self.copy(layer, [e for e in loads if e not in later])
            if w == 0 and prefetcher is not None:
                issued = prefetcher.after_access(layer, experts, plan)
                if issued is not None:
                    self.copy(issued.layer, issued.experts)
            if later:
                self.copy(layer, later)
        self.unhold()

    def result(self, expert_bytes: int | None) -> HostTierResult:
        counts = LowerTierCounts.of(self.cache)
        return HostTierResult(
            capacity=self.cache.capacity,
            slots=self.cache.slots,
            hits=counts.hits,
            misses=counts.misses,
            read_ahead=counts.read_ahead,
            disk_reads=counts.reads,
            belady_disk_reads=self._belady_reads(),
            expert_bytes=expert_bytes,
        )

    def _belady_reads(self) -> int:
        """Disk reads of Belady's RAM tier on the same accesses, demand paging."""
        c = self.cache
        future: dict[int, list[int]] = {}
        for t, (layer, experts) in enumerate(self.accesses):
            for e in experts:
                future.setdefault(layer * c.num_experts + e, []).append(t)
        bound = ExpertCache(
            c.num_layers, c.num_experts, c.capacity, make_policy_factory("belady", future=future), c.scope
        )
        for layer, experts in self.accesses:
            bound.access(layer, experts)
        return bound.misses
