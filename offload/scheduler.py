"""Plan, then execute: the cache decides (pure Python), the copy engine moves bytes and waits.

``plan()`` is the cache's decision for one layer access and has no side effects on tensors, so it can be
logged and asserted on; ``execute()`` only issues the copies a wave needs and makes compute wait for them.
"""

from __future__ import annotations

from cache_policies import AccessPlan, ExpertCache, Wave
from offload.store import HostExpertStore
from offload.transport import CopyEngine


class Scheduler:
    def __init__(self, cache: ExpertCache, store: HostExpertStore, engine: CopyEngine) -> None:
        self.cache = cache
        self.store = store
        self.engine = engine
        self.waves = 0

    def plan(self, layer: int, experts: list[int]) -> AccessPlan:
        """Hits, misses, victims and slots for ``experts`` (ascending) of MoE layer ``layer``."""
        return self.cache.access(layer, experts)

    def execute(self, layer: int, wave: Wave) -> None:
        """Copy the wave's misses into their slots and make compute wait for exactly those slots."""
        loads = [(wave.slots[i], self.store.expert(layer, wave.experts[i])) for i in wave.loads]
        self.engine.load(loads)
        self.engine.acquire(wave.slots)
        self.waves += 1

    def finish(self, wave: Wave) -> None:
        """Compute has issued every read of the wave's slots."""
        self.engine.release(wave.slots)
