"""Expert cache policies, routing traces and the trace-replay simulator. Pure Python and numpy: no torch."""

from cache_policies.cache import AccessPlan, ExpertCache, Scope, Wave
from cache_policies.lru import LRU
from cache_policies.policy import CachePolicy
from cache_policies.registry import ONLINE_POLICIES, POLICIES, make_policy_factory

__all__ = [
    "LRU",
    "ONLINE_POLICIES",
    "POLICIES",
    "AccessPlan",
    "CachePolicy",
    "ExpertCache",
    "Scope",
    "Wave",
    "make_policy_factory",
]
