"""moe-offload: run Mixture-of-Experts models larger than GPU memory.

    model = offload.from_pretrained(path, vram_budget="12GB")
    model.generate(...)
    offload.stats(model).hit_rate
    offload.close(model)              # pinned host memory, copy thread or stream, slots: released now

Names are imported on first use, so ``offload-bench sweep`` (pure Python) starts without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "from_pretrained": "offload.api",
    "wrap": "offload.api",
    "stats": "offload.api",
    "close": "offload.api",
    "override_routing": "offload.api",
    "routing_trace": "offload.api",
    "BudgetPlan": "offload.runtime.budget",
    "OffloadConfig": "offload.config",
    "BudgetError": "offload.errors",
    "CheckpointError": "offload.errors",
    "HostMemoryError": "offload.errors",
    "OffloadError": "offload.errors",
    "UnsupportedModelError": "offload.errors",
    "OffloadStats": "offload.offload_stats",
    "format_size": "offload.units",
    "parse_size": "offload.units",
}
__all__ = [
    "BudgetError",
    "BudgetPlan",
    "CheckpointError",
    "HostMemoryError",
    "OffloadConfig",
    "OffloadError",
    "OffloadStats",
    "UnsupportedModelError",
    "close",
    "format_size",
    "from_pretrained",
    "override_routing",
    "parse_size",
    "routing_trace",
    "stats",
    "wrap",
]

if TYPE_CHECKING:
    from offload.api import close, from_pretrained, override_routing, routing_trace, stats, wrap
    from offload.config import OffloadConfig
    from offload.errors import (
        BudgetError,
        CheckpointError,
        HostMemoryError,
        OffloadError,
        UnsupportedModelError,
    )
    from offload.offload_stats import OffloadStats
    from offload.runtime.budget import BudgetPlan
    from offload.units import format_size, parse_size


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'offload' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
