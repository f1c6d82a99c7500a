"""transformers integration: build the skeleton, load experts into the host store, swap in the offloaded module.

Loading reuses transformers' own checkpoint conversion (key renames, per-expert merges, transposes) so every
architecture's on-disk layout is handled by the code that defines it. It runs in chunks:

1. the model skeleton is built on the meta device and surveyed; the budget is checked before a byte is read;
2. for each MoE layer, only that layer's expert tensors are converted, on the CPU, packed into the host
   store and released, and the experts module is replaced; peak host RAM stays near the final store;
3. everything else is loaded straight to the device, then transformers' finalization moves non-persistent
   buffers, initializes them and ties weights.
"""

from __future__ import annotations

import contextlib
import copy
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    WeightConverter,
    WeightRenaming,
    convert_and_load_state_dict_in_model,
    rename_source_key,
)
from transformers.modeling_utils import LoadStateDictConfig
from transformers.models.auto.auto_factory import _get_model_class
from transformers.utils import logging as hf_logging
from transformers.utils.loading_report import LoadStateDictInfo

from offload.architectures import unsupported_message
from offload.budget import BudgetPlan, plan_budget
from offload.checkpoint import Checkpoint, close_shards, load_config, open_shards, resolve
from offload.config import OffloadConfig
from offload.errors import CheckpointError, UnsupportedModelError
from offload.experts import OffloadedExperts
from offload.hostmem import release_freed_host_memory
from offload.kernels import ExpertActivation
from offload.predict import LookaheadPredictor
from offload.quantized import dequantizing_quantizer
from offload.runtime import OffloadRuntime
from offload.survey import ModelSurvey, expert_param_names, survey

RUNTIME_ATTR = "_offload_runtime"


def plan_for(model_survey: ModelSurvey, config: OffloadConfig) -> BudgetPlan:
    workspace = config.workspace_bytes
    if workspace is None:
        workspace = model_survey.workspace_bytes(config.max_context)
    return plan_budget(
        budget_bytes=config.vram_budget,
        resident_bytes=model_survey.resident_bytes,
        kv_cache_bytes=model_survey.kv_bytes_per_token * config.max_context,
        workspace_bytes=workspace,
        expert_bytes=model_survey.layout.nbytes,
        num_layers=model_survey.num_layers,
        num_experts=model_survey.num_experts,
        top_k=model_survey.top_k,
        per_layer=config.cache_scope == "layer",
    )


def budget_for_slots(model_survey: ModelSurvey, config: OffloadConfig, slots: int) -> int:
    """The budget that leaves exactly ``slots`` expert slots with ``config``'s other settings."""
    plan = plan_for(model_survey, replace(config, vram_budget=2**62))
    return plan.fixed_bytes + slots * plan.expert_bytes


def survey_checkpoint(name_or_path: str, dtype: torch.dtype | None = None) -> ModelSurvey:
    """Survey a checkpoint without reading its weights."""
    skeleton = _skeleton(resolve(name_or_path), dtype)
    return survey(skeleton.model, skeleton.dtype)


@dataclass
class _Skeleton:
    model: PreTrainedModel  # on the meta device: shapes and names, no memory
    dtype: torch.dtype
    quantizer: Any  # transformers' quantizer, set to dequantize; None for full-precision checkpoints


def _skeleton(checkpoint: Checkpoint, dtype: torch.dtype | None) -> _Skeleton:
    model_class, hf_config = model_class_for(load_config(checkpoint))
    quantizer = dequantizing_quantizer(hf_config)
    # A quantized checkpoint that names no compute dtype gets bf16, what such checkpoints are quantized from.
    dtype = dtype or checkpoint_dtype(hf_config, torch.float32 if quantizer is None else torch.bfloat16)
    with torch.device("meta"):
        model = model_class._from_config(hf_config, dtype=dtype)
    if quantizer is not None:  # as from_pretrained does; dequantizing replaces no module
        quantizer.preprocess_model(model=model, dtype=dtype, device_map=None, checkpoint_files=None)
    return _Skeleton(model, dtype, quantizer)


def load_offloaded(name_or_path: str, config: OffloadConfig, progress: bool = True) -> PreTrainedModel:
    """Build an offloaded transformers model from a safetensors checkpoint."""
    checkpoint = resolve(name_or_path)
    skeleton = _skeleton(checkpoint, config.dtype)
    model, dtype = skeleton.model, skeleton.dtype
    runtime = new_runtime(model, dtype, config, model_name=str(name_or_path))
    shards = open_shards(checkpoint)
    try:
        _load_weights(model, checkpoint, shards, runtime, dtype, skeleton.quantizer, progress)
    finally:
        close_shards(shards)
    if skeleton.quantizer is not None:  # drops the quantization config: the weights are dequantized
        skeleton.quantizer.postprocess_model(model)
    model.eval()
    if model.can_generate():
        # No generation_config.json: keep the one derived from the model config.
        with contextlib.suppress(OSError):
            model.generation_config = GenerationConfig.from_pretrained(checkpoint.directory)
    attach_runtime(model, runtime)
    return model


def wrap_model(model: PreTrainedModel, config: OffloadConfig, progress: bool = True) -> PreTrainedModel:
    """Offload the experts of a model already loaded on the CPU; everything else moves to the device."""
    if getattr(model, RUNTIME_ATTR, None) is not None:
        raise UnsupportedModelError("this model is already offloaded")
    dtype = config.dtype or model.dtype
    model_name = str(getattr(model.config, "name_or_path", "") or model.config.model_type)
    runtime = new_runtime(model, dtype, config, model_name)
    names = runtime.survey.layer_names
    for layer, name in enumerate(tqdm(names, desc="Packing experts", unit="layer", disable=not progress)):
        take_over_experts(model, runtime, layer, name)
    model.to(device=config.device, dtype=dtype)  # type: ignore[call-arg]
    attach_runtime(model, runtime)
    return model


def new_runtime(
    model: PreTrainedModel, dtype: torch.dtype, config: OffloadConfig, model_name: str
) -> OffloadRuntime:
    """Survey ``model`` (meta or loaded), check the budget, and allocate its runtime; no weight moves yet."""
    model_survey = survey(model, dtype)
    return OffloadRuntime(config, model_survey, plan_for(model_survey, config), model_name=model_name)


def attach_runtime(model: nn.Module, runtime: OffloadRuntime) -> None:
    """The last step of every builder: the lookahead predictor (it needs the model's routers) and the handle
    that offload.stats and friends find the runtime by."""
    if runtime.config.prefetch == "lookahead":
        runtime.lookahead = LookaheadPredictor.from_model(model, runtime.survey.layer_names)
    setattr(model, RUNTIME_ATTR, runtime)


def runtime_of(model: nn.Module) -> OffloadRuntime:
    runtime = getattr(model, RUNTIME_ATTR, None)
    if runtime is None:
        raise ValueError("this model is not offloaded: build it with offload.from_pretrained or offload.wrap")
    return runtime


GENERATIVE_AUTO_CLASSES = (AutoModelForCausalLM, AutoModelForImageTextToText)


def model_class_for(hf_config: PretrainedConfig) -> tuple[type[PreTrainedModel], PretrainedConfig]:
    """The text-generation class transformers' Auto classes would build for ``hf_config``, and the config
    to build it with (a composite config's text part, when the class takes only that)."""
    for auto in GENERATIVE_AUTO_CLASSES:
        if type(hf_config) not in auto._model_mapping:
            continue
        model_class: type[PreTrainedModel] = _get_model_class(hf_config, auto._model_mapping)
        text_class = (getattr(hf_config, "sub_configs", None) or {}).get("text_config")
        if text_class is not None and getattr(model_class, "config_class", None) is text_class:
            quantization = getattr(hf_config, "quantization_config", None)
            hf_config = hf_config.get_text_config()
            if quantization is not None:
                hf_config.quantization_config = quantization
        return model_class, hf_config
    raise UnsupportedModelError(
        unsupported_message(hf_config.model_type, "transformers has no text-generation class for it")
    )


def checkpoint_dtype(hf_config: PretrainedConfig, default: torch.dtype = torch.float32) -> torch.dtype:
    dtype = getattr(hf_config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return (
        dtype
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype.itemsize >= 2
        else default
    )


# -- loading ----------------------------------------------------------------------------------------------


def _load_weights(
    model: PreTrainedModel,
    checkpoint: Checkpoint,
    shards: list,
    runtime: OffloadRuntime,
    dtype: torch.dtype,
    quantizer: Any,
    progress: bool,
) -> None:
    handle_of = {key: handle for handle in shards for key in handle.keys()}  # noqa: SIM118 - not a dict
    conversions = get_model_conversion_mapping(model, hf_quantizer=quantizer)
    layer_names = runtime.survey.layer_names
    by_layer, rest = _route_keys(model, conversions, handle_of, layer_names, checkpoint)
    dtype_plan = model._get_dtype_plan(dtype)

    def chunk_config(device: torch.device | str) -> LoadStateDictConfig:
        return LoadStateDictConfig(
            pretrained_model_name_or_path=str(checkpoint.directory),
            device_map={"": device},
            dtype=dtype,
            dtype_plan=dtype_plan,
            hf_quantizer=quantizer,
            weight_mapping=copy.deepcopy(conversions),  # type: ignore[arg-type]
        )

    def slices(keys: list[str]) -> dict[str, Any]:
        return {key: handle_of[key].get_slice(key) for key in keys}

    with _quiet_transformers_progress():
        bar = tqdm(layer_names, desc="Loading experts", unit="layer", disable=not progress)
        for layer, name in enumerate(bar):
            info, _ = convert_and_load_state_dict_in_model(
                model, slices(by_layer[layer]), chunk_config("cpu")
            )
            _raise_on_errors(info, checkpoint)
            take_over_experts(model, runtime, layer, name)
            release_freed_host_memory()
        load_config = chunk_config(runtime.config.device)
        info, _ = convert_and_load_state_dict_in_model(model, slices(rest), load_config)
        info = type(model)._finalize_model_loading(model, load_config, info)
    _raise_on_errors(info, checkpoint, check_missing=True)
    on_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise CheckpointError(
            f"checkpoint {checkpoint.directory} left {len(on_meta)} tensors unloaded, e.g. {on_meta[0]}"
        )


def _route_keys(
    model: PreTrainedModel,
    conversions: list[Any],
    handle_of: dict[str, Any],
    layer_names: tuple[str, ...],
    checkpoint: Checkpoint,
) -> tuple[list[list[str]], list[str]]:
    """Checkpoint keys per MoE layer (by the parameter each one becomes) and all other keys.

    Also checks, before any weight is read, that the keys cover every parameter of the model.
    """
    transforms = copy.deepcopy(conversions)  # renaming marks transforms as used; keep the originals clean
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta_state = model.state_dict()
    layer_of = {name: i for i, name in enumerate(layer_names)}
    by_layer: list[list[str]] = [[] for _ in layer_names]
    rest: list[str] = []
    targets: set[str] = set()
    pattern_owner = {pattern: c for c in converters for pattern in c.source_patterns}
    for key in handle_of:
        target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state)
        # As transformers does: a rename that lands nowhere falls back to the key itself.
        if target not in meta_state and key in meta_state:
            target, pattern = rename_source_key(key, [], [], model.base_model_prefix, meta_state)
        targets.add(target)
        if pattern is not None:  # a one-to-many converter (one fused tensor split in several) names its first
            first, *others = pattern_owner[pattern].target_patterns
            targets.update(target.replace(first, other) for other in others)
        layer = layer_of.get(target.rpartition(".")[0])
        (rest if layer is None else by_layer[layer]).append(key)
    missing = set(meta_state) - targets - set(getattr(model, "all_tied_weights_keys", {}) or {})
    info = LoadStateDictInfo(missing, set(), set(), [], {}, set())
    model._adjust_missing_and_unexpected_keys(info)  # drops keys the model declares optional
    if info.missing_keys:
        _raise_on_errors(info, checkpoint, check_missing=True)
    return by_layer, rest


def _raise_on_errors(info: Any, checkpoint: Checkpoint, check_missing: bool = False) -> None:
    where = checkpoint.directory
    if info.mismatched_keys:
        key, got, expected = sorted(info.mismatched_keys)[0]
        raise CheckpointError(
            f"checkpoint {where} does not match its config: {key} has shape {tuple(got)}, expected {tuple(expected)}"
        )
    if info.conversion_errors:
        key, message = next(iter(info.conversion_errors.items()))
        raise CheckpointError(f"checkpoint {where}: cannot convert {key}: {str(message).splitlines()[0]}")
    if check_missing and info.missing_keys:
        missing = sorted(info.missing_keys)
        raise CheckpointError(
            f"checkpoint {where} is missing {len(missing)} weight(s), e.g. {missing[0]}: truncated or for another model"
        )


@contextmanager
def _quiet_transformers_progress():
    """transformers draws a bar per load call; ours counts layers instead."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


# -- replacing the experts modules ------------------------------------------------------------------------


def take_over_experts(model: nn.Module, runtime: OffloadRuntime, layer: int, name: str) -> None:
    """Pack the experts module ``name`` into the host store, free its weights, and put ours in its place."""
    module = model.get_submodule(name)
    param_names = expert_param_names(runtime.survey.layout)
    weights = {p: getattr(module, p) for p in param_names}
    unloaded = [p for p, t in weights.items() if t is None or t.is_meta]
    if unloaded:
        raise CheckpointError(f"the checkpoint has no {unloaded[0]} for {name}")
    runtime.attach_layer(layer, {p: t.detach() for p, t in weights.items()}, ExpertActivation.from_hf(module))
    # The host store has the bytes now. A custom gate may keep the module alive, but not its weights.
    for p in param_names:
        setattr(module, p, None)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, OffloadedExperts(runtime, layer, module, placeholders=weights))
