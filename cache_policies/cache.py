"""The expert cache: residency, slot numbers and waves, driven by a :class:`CachePolicy`.

One class serves the runtime and the trace simulator, so both make identical decisions (invariant
*same-decisions*, docs/architecture.md).

Semantics of one layer access (the experts one MoE layer needs for one forward call):

- Experts are touched in ascending id order: first every resident one (a hit, reported to the policy in
  ascending order), then every missing one (a miss, loaded in ascending order), which takes a free slot, or
  the slot of a victim the policy picks. The layer's own experts are never evicted to make room for each
  other. (Hits before loads is what ``reference_hit_rates.txt`` specifies for LRU; the other policies do not
  depend on it.)
- If the layer needs more experts than its partition has slots (prefill over many tokens), the access runs
  in *waves*: the first wave holds every resident expert (all hits) and then misses in ascending order until
  the partition is full; each later wave loads the next misses and may evict experts of earlier waves,
  whose computation is done. Only a single token's top-k must fit at once.

Scope ``"layer"`` gives each layer its own partition (its own slots and policy); ``"global"`` shares one
partition of ``capacity`` slots across all layers.

Prefetch (:meth:`ExpertCache.prefetch`) makes predicted experts resident ahead of their layer, outside any
demand access: no hit or miss is counted. A prefetched expert never evicts the running layer's experts nor
another expert of the same prefetch, and takes a slot only while some other key can give one up. Until a
demand access uses it, it is marked: the access reports it in ``AccessPlan.prefetched`` (the prefetch was
useful), and an eviction first counts it in ``prefetch_wasted``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Literal

from cache_policies.policy import CachePolicy

Scope = Literal["layer", "global"]
PolicyFactory = Callable[[int], CachePolicy]  # capacity -> a fresh policy
# (missing experts ascending, hits of the access) -> the missing experts to compute on the host, not admitted
HostChoice = Callable[[list[int], int], Collection[int]]


@dataclass(slots=True)
class Wave:
    """Experts of one layer that are resident together and computed together."""

    experts: list[int] = field(default_factory=list)  # ascending within the wave
    slots: list[int] = field(default_factory=list)  # slot of each expert, same order
    loads: list[int] = field(default_factory=list)  # positions in `experts` that must be copied in
    evicted: list[tuple[int, int]] = field(default_factory=list)  # (layer, expert) that lost a slot


@dataclass(slots=True)
class AccessPlan:
    layer: int
    waves: list[Wave]
    hits: int
    misses: int
    prefetched: list[int] = field(default_factory=list)  # hits that a prefetch made resident, ascending
    host: list[int] = field(default_factory=list)  # misses computed on the host, not admitted; ascending


@dataclass(slots=True)
class Prefetch:
    """Predicted experts of one layer to copy in ahead of their use."""

    layer: int
    experts: list[int] = field(default_factory=list)  # ascending
    slots: list[int] = field(default_factory=list)
    evicted: list[tuple[int, int]] = field(default_factory=list)


@dataclass(slots=True)
class _Partition:
    policy: CachePolicy
    capacity: int
    first_slot: int
    resident: dict[int, int] = field(default_factory=dict)  # key -> slot
    free: list[int] = field(default_factory=list)  # popped from the end: lowest slot first

    def __post_init__(self) -> None:
        self.free = list(range(self.first_slot + self.capacity - 1, self.first_slot - 1, -1))


class ExpertCache:
    """Residency of ``(layer, expert)`` keys in ``slots`` device slots.

    ``capacity`` is the slot count of one partition: per layer for scope ``"layer"``, in total for
    ``"global"``. ``slots`` is the total either way.
    """

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        capacity: int,
        policy: PolicyFactory,
        scope: Scope = "global",
    ) -> None:
        if num_layers < 1 or num_experts < 1:
            raise ValueError(f"need at least one layer and one expert, got {num_layers} x {num_experts}")
        if scope not in ("layer", "global"):
            raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
        capacity = min(capacity, num_experts if scope == "layer" else num_layers * num_experts)
        parts = num_layers if scope == "layer" else 1
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.scope: Scope = scope
        self.capacity = capacity
        self.slots = capacity * parts
        self._parts = [_Partition(policy(capacity), capacity, i * capacity) for i in range(parts)]
        self._now = 0
        self._prefetched: set[int] = set()  # keys a prefetch made resident that no demand access used yet
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.prefetch_issued = 0
        self.prefetch_hits = 0  # prefetched experts a demand access then found resident
        self.prefetch_wasted = 0  # prefetched experts evicted before any demand access used them
        self.host_computed = 0  # missed experts computed on the host instead of copied (not in ``misses``)

    # -- queries -------------------------------------------------------------------------------------
    def slot_of(self, layer: int, expert: int) -> int | None:
        key = layer * self.num_experts + expert
        return self._partition(layer).resident.get(key)

    def resident(self) -> dict[tuple[int, int], int]:
        """Every resident ``(layer, expert)`` and its slot."""
        out = {}
        for part in self._parts:
            for key, slot in part.resident.items():
                out[divmod(key, self.num_experts)] = slot
        return out

    def _partition(self, layer: int) -> _Partition:
        return self._parts[layer if self.scope == "layer" else 0]

    # -- the one decision path -----------------------------------------------------------------------
    def access(self, layer: int, experts: Sequence[int], host: HostChoice | None = None) -> AccessPlan:
        """Plan one layer access. ``experts`` must be unique and ascending.

        ``host`` (the copy-or-compute rule, :mod:`cache_policies.copy_or_compute`) picks missing experts to
        compute on the host: the policy sees their use (``use``, after the hits) but they are not admitted,
        take no slot and are in no wave; they are counted in ``host_computed``, not in ``misses``."""
        part = self._partition(layer)
        policy = part.policy
        policy.begin_access(self._now)
        self._now += 1
        base = layer * self.num_experts
        resident = part.resident
        hit_experts = [e for e in experts if base + e in resident]
        missing = [e for e in experts if base + e not in resident] if len(hit_experts) < len(experts) else []
        # Every hit is recorded before the first miss is loaded: the residents are all in the first wave,
        # and for LRU this order is part of the reference semantics (a hit is not staler than a load).
        policy.hits([base + e for e in hit_experts])
        hosted: list[int] = []
        if host is not None and missing:
            chosen = host(missing, len(hit_experts))
            if chosen:
                hosted = [e for e in missing if e in chosen]
                missing = [e for e in missing if e not in chosen]
                experts = [e for e in experts if e not in chosen]
                for e in hosted:
                    policy.use(base + e)
                self.host_computed += len(hosted)
        prefetched = []
        if self._prefetched:
            prefetched = [e for e in hit_experts if base + e in self._prefetched]
            self._prefetched.difference_update(base + e for e in prefetched)
            self.prefetch_hits += len(prefetched)
        if len(experts) <= part.capacity:
            waves = (
                [self._single_wave(part, base, experts)] if missing else [self._all_hits(part, base, experts)]
            )
        else:
            waves = self._waves(part, base, hit_experts, missing)
        misses = len(missing)
        hits = len(experts) - misses
        self.hits += hits
        self.misses += misses
        return AccessPlan(layer, waves, hits, misses, prefetched, hosted)

    def prefetch(
        self, layer: int, experts: Sequence[int], running_layer: int, running: Sequence[int] = ()
    ) -> Prefetch:
        """Make ``experts`` of ``layer`` (ascending, unique) resident ahead of use, without counting a hit or a
        miss. ``running`` experts of ``running_layer`` are in use and never evicted. Experts already resident
        are skipped; so are the rest once no key can give up its slot."""
        part = self._partition(layer)
        part.policy.begin_access(self._now - 1)  # the running access's time (a per-layer partition lags)
        base = layer * self.num_experts
        wanted = [e for e in experts if base + e not in part.resident]
        plan = Prefetch(layer)
        if not wanted:
            return plan
        protected = {running_layer * self.num_experts + e for e in running} | {base + e for e in experts}
        evictable = sum(1 for key in part.resident if key not in protected)
        wave = Wave()
        for expert in wanted:
            if not part.free:
                if evictable == 0:
                    break
                evictable -= 1
            slot = self._make_room(part, protected, wave)
            key = base + expert
            part.policy.insert(key)
            part.resident[key] = slot
            self._prefetched.add(key)
            plan.experts.append(expert)
            plan.slots.append(slot)
        plan.evicted = wave.evicted
        self.prefetch_issued += len(plan.experts)
        return plan

    def _all_hits(self, part: _Partition, base: int, experts: Sequence[int]) -> Wave:
        resident = part.resident
        return Wave(list(experts), [resident[base + e] for e in experts])

    def _single_wave(self, part: _Partition, base: int, experts: Sequence[int]) -> Wave:
        resident, policy = part.resident, part.policy
        protected = {base + e for e in experts}
        wave = Wave(list(experts))
        slots = wave.slots
        for i, expert in enumerate(experts):
            key = base + expert
            slot = resident.get(key)
            if slot is None:
                slot = self._make_room(part, protected, wave)
                policy.use(key)
                policy.insert(key)
                resident[key] = slot
                wave.loads.append(i)
            slots.append(slot)
        return wave

    def _waves(self, part: _Partition, base: int, hit_experts: list[int], missing: list[int]) -> list[Wave]:
        resident, policy = part.resident, part.policy
        waves: list[Wave] = []
        room = part.capacity - len(hit_experts)  # all hits fit: the partition holds them right now
        todo = hit_experts + missing[:room]
        todo.sort()
        pending = missing[room:]
        current = Wave()
        while True:
            protected = {base + e for e in todo}
            for expert in todo:
                key = base + expert
                slot = resident.get(key)
                if slot is None:
                    slot = self._make_room(part, protected, current)
                    policy.use(key)
                    policy.insert(key)
                    resident[key] = slot
                    current.loads.append(len(current.experts))
                current.experts.append(expert)
                current.slots.append(slot)
            waves.append(current)
            if not pending:
                return waves
            todo, pending = pending[: part.capacity], pending[part.capacity :]
            current = Wave()

    def _make_room(self, part: _Partition, protected: set[int], wave: Wave) -> int:
        if part.free:
            return part.free.pop()
        victim = part.policy.evict(protected)
        self.evictions += 1
        if victim in self._prefetched:
            self._prefetched.discard(victim)
            self.prefetch_wasted += 1
        wave.evicted.append(divmod(victim, self.num_experts))
        return part.resident.pop(victim)
