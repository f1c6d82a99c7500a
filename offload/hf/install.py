"""Installing the runtime into a transformers model: the experts modules swapped, the handle attached.

``new_runtime`` opens every model builder (survey, budget, runtime; no weight moves yet), ``take_over_experts``
swaps one experts module for :class:`OffloadedExperts` once its weights are in the host store, and
``attach_runtime`` closes it (the router predictors, which need the model's modules, and the handle that
``offload.stats`` and friends find the runtime by).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers import PreTrainedModel

from offload.config import OffloadConfig
from offload.errors import CheckpointError, OffloadError
from offload.hf.activation import activation_of
from offload.hf.expert_formats import with_format
from offload.hf.experts import OffloadedExperts
from offload.hf.prefetch import install_predictor, resolve_prefetch
from offload.hf.survey import expert_param_names, survey
from offload.runtime.budget import plan_budget
from offload.runtime.host_plan import check_host_memory, int4pack_copy_bytes, int4pack_copy_fits
from offload.runtime.runtime import OffloadRuntime

RUNTIME_ATTR = "_offload_runtime"


def new_runtime(
    model: PreTrainedModel, dtype: torch.dtype, config: OffloadConfig, model_name: str, reading: bool = False
) -> OffloadRuntime:
    """Survey ``model`` (meta or loaded), check the budget, and allocate its runtime; no weight moves yet.
    The experts' storage format is part of the survey: slots are counted in it. ``reading``: the weights are
    still to be read from the checkpoint (a quantized one's experts can then be kept in its format), so host
    RAM is checked too before any is."""
    model_survey = with_format(survey(model, dtype), config, model.config if reading else None)
    budget = plan_budget(model_survey, config)
    host_tier_slots, plan = None, None
    if reading:
        plan = check_host_memory(model_survey, config, budget.planned_bytes, slots=budget.slots)
        int4pack = plan.int4pack_bytes > 0
        host_tier_slots = plan.host_tier_slots
    else:
        int4pack = int4pack_copy_fits(int4pack_copy_bytes(model_survey, config, budget.slots), config)
    # One mode, known before the runtime is built (its copy engine overlaps copies with compute or not)
    config = dataclasses.replace(config, prefetch=resolve_prefetch(model, model_survey, budget, config))
    runtime = OffloadRuntime(
        config,
        model_survey,
        budget,
        model_name=model_name,
        int4pack_copy=int4pack,
        host_tier_slots=host_tier_slots,
    )
    runtime.host_plan = plan
    return runtime


def take_over_experts(
    model: nn.Module,
    runtime: OffloadRuntime,
    layer: int,
    name: str,
    packed: dict[str, torch.Tensor] | None = None,
    stored: bool = False,
) -> None:
    """Pack the experts module ``name`` into the host store, free its weights, and put ours in its place.
    ``packed``: the layer's fields already in the layout's format (a native MXFP4/FP8 checkpoint's experts,
    read by the loader; the module then holds only its biases). ``stored``: the disk tier's store holds the
    layer from an earlier load already."""
    module = model.get_submodule(name)
    param_names = expert_param_names(runtime.survey.layout)
    weights = {p: getattr(module, p) for p in param_names}
    if stored:
        runtime.attach_stored_layer(layer, activation_of(module))
    elif packed is None:
        unloaded = [p for p, t in weights.items() if t is None or t.is_meta]
        if unloaded:
            raise CheckpointError(f"the checkpoint has no {unloaded[0]} for {name}")
        runtime.attach_layer(layer, {p: t.detach() for p, t in weights.items()}, activation_of(module))
    else:
        runtime.attach_packed_layer(layer, packed, activation_of(module))
    # The host store has the bytes now. A custom gate may keep the module alive, but not its weights.
    for p in param_names:
        setattr(module, p, None)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, OffloadedExperts(runtime, layer, module, placeholders=weights))


def attach_runtime(model: nn.Module, runtime: OffloadRuntime) -> None:
    """The last step of every builder: the router predictors (they need the model's routers; pre-attention
    also its norms and a hook on each decoder layer), host compute's kernel and rates (probed now, while no
    forward holds the memory the probes borrow), the prefill chunk generate() uses, and the handle that
    offload.stats and friends find the runtime by."""
    install_predictor(model, runtime)
    runtime.prepare_kernels()
    chunk = runtime.budget.prefill_chunk
    generation_config = getattr(model, "generation_config", None)
    if chunk is not None and generation_config is not None:
        # generate() prefills in chunks of the size whose workspace the budget holds (transformers' own
        # chunked prefill); a generate(prefill_chunk_size=...) call still overrides it
        generation_config.prefill_chunk_size = chunk
    setattr(model, RUNTIME_ATTR, runtime)


def runtime_of(model: nn.Module) -> OffloadRuntime:
    runtime = getattr(model, RUNTIME_ATTR, None)
    if runtime is None:
        raise OffloadError(
            "this model is not offloaded: build it with offload.from_pretrained or offload.wrap"
        )
    return runtime
