"""The public Python API: a normal transformers model back, with its experts offloaded."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from offload.config import OffloadConfig
from offload.hf.install import runtime_of
from offload.hf.load import load_offloaded, wrap_model
from offload.offload_stats import OffloadStats
from offload.runtime.layer_step import RoutingOverride

if TYPE_CHECKING:
    from transformers import PreTrainedModel

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


def stats(model: nn.Module) -> OffloadStats:
    """Counters of an offloaded model since it was loaded."""
    return runtime_of(model).stats()


def close(model: nn.Module) -> None:
    """Release an offloaded model's host store (pinned memory unregistered), copy thread or stream (after the
    copies in flight land) and expert slots now, rather than whenever it is garbage-collected. Calling the
    model afterwards raises :class:`offload.OffloadError`; closing twice is harmless."""
    runtime_of(model).close()


def override_routing(model: nn.Module, override: RoutingOverride | None) -> None:
    """Replace the experts the routers choose: ``override(layer, top_k_index, top_k_weights)`` returns the
    ``(top_k_index, top_k_weights)`` to use instead (same shapes), for every MoE layer call from now on;
    ``None`` restores the routers' own. Recording and the cache see the overridden routing. For experiments
    (forcing recorded routing onto a model, ablations); outputs then follow the overridden experts."""
    runtime_of(model).override_routing(override)


def routing_trace(model: nn.Module) -> RoutingTrace:
    """The routing of every forward so far, as a :class:`cache_policies.RoutingTrace` (``.save(path)`` writes
    the native format). Needs ``record_trace=True`` at load time."""
    runtime = runtime_of(model)
    if runtime.recorder is None:
        raise ValueError("routing is not being recorded: load the model with record_trace=True")
    if runtime.recorder.num_steps == 0:
        raise ValueError("nothing recorded yet: run a forward or generate() first")
    return runtime.recorder.trace(model=runtime.model_name, expert_bytes=runtime.survey.layout.nbytes)
