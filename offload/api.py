"""The public Python API: a normal transformers model back, with its experts offloaded."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedModel

from offload.config import OffloadConfig
from offload.counters import OffloadStats
from offload.hf import load_offloaded, runtime_of, wrap_model

if TYPE_CHECKING:
    from cache_policies import RoutingTrace


def from_pretrained(
    name_or_path: str | Path,
    vram_budget: str | int = "12GB",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    policy: str = "lru",
    max_context: int = 4096,
    progress: bool = True,
    **options: Any,
) -> PreTrainedModel:
    """Load a Hugging Face MoE checkpoint whose experts need not fit in ``vram_budget``.

    Args:
        name_or_path: checkpoint directory, or a hub id already in the local Hugging Face cache.
        vram_budget: all the device memory the runtime may use, as bytes or a size such as ``"12GB"``.
        device: ``None`` for CUDA when present, else CPU.
        dtype: compute dtype (``"bf16"``, ``"fp16"``, ``"fp32"`` or a torch dtype); ``None`` keeps the
            checkpoint's.
        policy: expert cache policy, e.g. ``"lru"``.
        max_context: tokens of KV cache (batch 1) the budget reserves.
        progress: draw a progress bar while loading.
        **options: further :class:`offload.OffloadConfig` fields (``cache_scope``, ``kernel``, ...).

    Returns:
        The transformers model; ``generate()``, tokenizers, streamers and pipelines work unchanged.

    Raises:
        offload.BudgetError: the budget is below the minimum for this model (the message says the minimum).
        offload.OffloadError: any other bad input (missing or corrupt checkpoint, dense or unsupported model).
    """
    config = OffloadConfig.create(
        vram_budget, device=device, dtype=dtype, policy=policy, max_context=max_context, **options
    )
    return load_offloaded(str(name_or_path), config, progress=progress)


def wrap(
    model: PreTrainedModel,
    vram_budget: str | int = "12GB",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    policy: str = "lru",
    max_context: int = 4096,
    progress: bool = True,
    **options: Any,
) -> PreTrainedModel:
    """Offload the experts of a transformers model already loaded on the CPU (same options as
    :func:`from_pretrained`). The model is modified in place and returned."""
    config = OffloadConfig.create(
        vram_budget, device=device, dtype=dtype, policy=policy, max_context=max_context, **options
    )
    return wrap_model(model, config, progress=progress)


def stats(model: PreTrainedModel) -> OffloadStats:
    """Counters of an offloaded model since it was loaded."""
    return runtime_of(model).stats()


def routing_trace(model: PreTrainedModel) -> RoutingTrace:
    """The routing of every forward so far, as a :class:`cache_policies.RoutingTrace` (``.save(path)`` writes
    the native format). Needs ``record_trace=True`` at load time."""
    runtime = runtime_of(model)
    if runtime.recorder is None:
        raise ValueError("routing is not being recorded: load the model with record_trace=True")
    if runtime.recorder.num_steps == 0:
        raise ValueError("nothing recorded yet: run a forward or generate() first")
    return runtime.recorder.trace(model=runtime.model_name, expert_bytes=runtime.survey.layout.nbytes)
