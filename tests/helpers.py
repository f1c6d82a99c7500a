"""Helpers the tests share: repository paths, and loading a tiny checkpoint offloaded at a given slot count."""

from __future__ import annotations

from pathlib import Path

import torch

import offload
from offload.config import OffloadConfig
from offload.hf.experts import OffloadedExperts
from offload.hf.skeleton import survey_checkpoint
from offload.runtime.budget import budget_for_slots

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT / "data" / "traces"

PROMPT_TOKENS = 12
NEW_TOKENS = 8
# fp32 on CPU: the per-expert torch path and transformers' grouped_mm differ only by summation order.
ATOL = RTOL = 1e-5


def slot_counts(path: Path) -> dict[str, int]:
    s = survey_checkpoint(str(path), torch.float32)
    return {
        "top_k": s.top_k,
        "quarter": max(s.top_k, round(0.25 * s.total_experts)),
        "half": round(0.5 * s.total_experts),
        "all": s.total_experts,
    }


def load(path: Path, slots: int, device: str, dtype: str = "fp32", **options) -> torch.nn.Module:
    config = OffloadConfig.create(1, device=device, dtype=dtype, max_context=64, **options)
    budget = budget_for_slots(survey_checkpoint(str(path), config.dtype), config, slots)
    return offload.from_pretrained(
        path, vram_budget=budget, device=device, dtype=dtype, max_context=64, progress=False, **options
    )


def prompt(device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(0, 128, (1, PROMPT_TOKENS), generator=generator).to(device)


def count_uses(model: torch.nn.Module) -> list[int]:
    """Independent count of expert uses: unique experts per layer call, seen from the module's inputs."""
    uses: list[int] = []

    def hook(module, args):
        uses.append(int(torch.unique(args[1]).numel()))

    for m in model.modules():
        if isinstance(m, OffloadedExperts):
            m.register_forward_pre_hook(hook)
    return uses
