"""moe-offload: run Mixture-of-Experts models larger than GPU memory.

model = offload.from_pretrained(path, vram_budget="12GB")
model.generate(...)
offload.stats(model).hit_rate
"""

from offload.api import from_pretrained, stats, wrap
from offload.budget import BudgetPlan
from offload.config import OffloadConfig
from offload.errors import BudgetError, CheckpointError, OffloadError, UnsupportedModelError
from offload.stats import OffloadStats
from offload.units import format_size, parse_size

__all__ = [
    "BudgetError",
    "BudgetPlan",
    "CheckpointError",
    "OffloadConfig",
    "OffloadError",
    "OffloadStats",
    "UnsupportedModelError",
    "format_size",
    "from_pretrained",
    "parse_size",
    "stats",
    "wrap",
]
