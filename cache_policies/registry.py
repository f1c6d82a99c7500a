"""Policies by name, as the CLI, the runtime and the sweeps spell them, with their keyword options."""

from __future__ import annotations

import functools
import inspect
from typing import Any

from cache_policies.cache import PolicyFactory
from cache_policies.policies.belady import Belady
from cache_policies.policies.fifo import FIFO
from cache_policies.policies.lfru import LFRU
from cache_policies.policies.lfu import LFU
from cache_policies.policies.lru import LRU
from cache_policies.policies.random_policy import RandomPolicy
from cache_policies.policies.static import Static
from cache_policies.policy import CachePolicy

POLICIES: dict[str, type[CachePolicy]] = {
    cls.name: cls for cls in (LRU, LFU, FIFO, RandomPolicy, LFRU, Static, Belady)
}
ONLINE_POLICIES: tuple[str, ...] = tuple(name for name, cls in POLICIES.items() if cls.online)


def policy_options(name: str) -> dict[str, bool]:
    """The keyword options policy ``name`` takes, each mapped to whether it is required."""
    params = list(inspect.signature(POLICIES[name].__init__).parameters.values())[2:]  # after self, capacity
    return {p.name: p.default is inspect.Parameter.empty for p in params}


def make_policy_factory(name: str, **options: Any) -> PolicyFactory:
    """Return ``capacity -> policy`` for policy ``name``; a clear ValueError for an unknown name or option.

    Options by policy: random ``seed``; lfru ``half_life``; static ``profile`` (use counts ``[layers,
    experts]``), ``dynamic_slots`` and ``scope`` (all required); belady ``future`` (required: key -> access
    times, see :func:`cache_policies.study.access.future_uses`). ``make_policy_factory("lru")`` takes none.
    """
    cls = POLICIES.get(name)
    if cls is None:
        raise ValueError(f"unknown cache policy {name!r}; choose one of: {', '.join(POLICIES)}")
    accepted = policy_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        takes = ", ".join(accepted) or "no options"
        raise ValueError(f"policy {name!r} does not take {', '.join(unknown)} (it takes: {takes})")
    missing = [option for option, required in accepted.items() if required and option not in options]
    if missing:
        if not cls.online:
            raise ValueError(
                f"policy {name!r} needs the future ({', '.join(missing)}) and runs only in the simulator"
            )
        raise ValueError(f"policy {name!r} needs option(s): {', '.join(missing)}")
    return functools.partial(cls, **options)
