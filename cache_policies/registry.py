"""Policies by name, as the CLI and the sweeps spell them."""

from __future__ import annotations

from cache_policies.cache import PolicyFactory
from cache_policies.lru import LRU
from cache_policies.policy import CachePolicy

POLICIES: dict[str, type[CachePolicy]] = {cls.name: cls for cls in (LRU,)}
ONLINE_POLICIES: tuple[str, ...] = tuple(name for name, cls in POLICIES.items() if cls.online)


def make_policy_factory(name: str) -> PolicyFactory:
    """Return ``capacity -> policy`` for an online policy name; a clear ValueError otherwise."""
    cls = POLICIES.get(name)
    if cls is None:
        raise ValueError(f"unknown cache policy {name!r}; choose one of: {', '.join(sorted(POLICIES))}")
    if not cls.online:
        raise ValueError(f"policy {name!r} needs the future and runs only in the simulator")
    return cls
