"""Expert cache policies, the prefetch protocol, routing traces and the trace-replay simulator.

Pure Python and numpy: no torch, no devices. The core (the cache, the policy interface and the policies in
``policies/``, predictors and the prefetch protocol) is what the runtime drives; ``study/`` holds what replays
and compares it offline: traces and their importers, the simulator, sweeps and their reports.
"""

from cache_policies.cache import AccessPlan, ExpertCache, HostChoice, Prefetch, Scope, Wave
from cache_policies.copy_or_compute import HOST_MODES, CopyOrCompute, HostMode, HostRates
from cache_policies.policies.belady import Belady
from cache_policies.policies.fifo import FIFO
from cache_policies.policies.lfru import LFRU
from cache_policies.policies.lfu import LFU
from cache_policies.policies.lru import LRU
from cache_policies.policies.random_policy import RandomPolicy
from cache_policies.policies.static import Static
from cache_policies.policy import CachePolicy
from cache_policies.predictors import PREFETCH_MODES, HistoryPredictor, next_layer
from cache_policies.prefetch import Guess, Predictor, Prefetcher
from cache_policies.registry import ONLINE_POLICIES, POLICIES, make_policy_factory, policy_options
from cache_policies.study.access import AccessSequence, expert_counts, future_uses
from cache_policies.study.importers import load_trace
from cache_policies.study.simulator import SimResult, TimingModel, simulate
from cache_policies.study.trace import RoutingTrace, TraceError

__all__ = [
    "FIFO",
    "HOST_MODES",
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
    "CopyOrCompute",
    "ExpertCache",
    "Guess",
    "HistoryPredictor",
    "HostChoice",
    "HostMode",
    "HostRates",
    "Predictor",
    "Prefetch",
    "Prefetcher",
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
