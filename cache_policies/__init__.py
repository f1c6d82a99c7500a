"""Expert cache policies, routing traces and the trace-replay simulator. Pure Python and numpy: no torch."""

from cache_policies.access import AccessSequence, expert_counts, future_uses
from cache_policies.belady import Belady
from cache_policies.cache import AccessPlan, ExpertCache, Prefetch, Scope, Wave
from cache_policies.fifo import FIFO
from cache_policies.importers import load_trace
from cache_policies.lfru import LFRU
from cache_policies.lfu import LFU
from cache_policies.lru import LRU
from cache_policies.policy import CachePolicy
from cache_policies.predictors import PREFETCH_MODES, HistoryPredictor, next_layer
from cache_policies.random_policy import RandomPolicy
from cache_policies.registry import ONLINE_POLICIES, POLICIES, make_policy_factory, policy_options
from cache_policies.simulator import SimResult, TimingModel, simulate
from cache_policies.static import Static
from cache_policies.trace import RoutingTrace, TraceError

__all__ = [
    "FIFO",
    "LFRU",
    "LFU",
    "LRU",
    "ONLINE_POLICIES",
    "POLICIES",
    "PREFETCH_MODES",
    "AccessPlan",
    "AccessSequence",
    "Belady",
    "CachePolicy",
    "ExpertCache",
    "HistoryPredictor",
    "Prefetch",
    "RandomPolicy",
    "RoutingTrace",
    "Scope",
    "SimResult",
    "Static",
    "TimingModel",
    "TraceError",
    "Wave",
    "expert_counts",
    "future_uses",
    "load_trace",
    "make_policy_factory",
    "next_layer",
    "policy_options",
    "simulate",
]
