"""The streaming load: a safetensors checkpoint into an offloaded model, one MoE layer at a time.

Loading reuses transformers' own checkpoint conversion (key renames, per-expert merges, transposes) so every
architecture's on-disk layout is handled by the code that defines it. It runs in chunks:

1. the model skeleton is built on the meta device and surveyed; the budget is checked before a byte is read
   (invariant *planned-memory*);
2. for each MoE layer, only that layer's expert tensors are converted, on the CPU, packed into the host
   store and released, and the experts module is replaced; peak host RAM stays near the final store;
3. everything else is loaded straight to the device, then transformers' finalization moves non-persistent
   buffers, initializes them and ties weights.
"""

from __future__ import annotations

import contextlib
import copy
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    WeightConverter,
    WeightRenaming,
    convert_and_load_state_dict_in_model,
    rename_source_key,
)
from transformers.modeling_utils import LoadStateDictConfig
from transformers.utils import logging as hf_logging
from transformers.utils.loading_report import LoadStateDictInfo

from offload.config import OffloadConfig
from offload.errors import CheckpointError, OffloadError, UnsupportedModelError
from offload.hf.checkpoint import Checkpoint, close_shards, open_shards, resolve
from offload.hf.expert_formats import canonical_biases, is_native_key, pack_layer
from offload.hf.install import RUNTIME_ATTR, attach_runtime, new_runtime, take_over_experts
from offload.hf.skeleton import build_skeleton
from offload.memory.disk_store import DiskStore
from offload.memory.formats import NATIVE_FORMATS
from offload.memory.host_memory import release_freed_host_memory
from offload.memory.int4pack import packing_identity
from offload.runtime.runtime import OffloadRuntime
from offload.user_cache import user_cache_dir


def load_offloaded(name_or_path: str, config: OffloadConfig, progress: bool = True) -> PreTrainedModel:
    """Build an offloaded transformers model from a safetensors checkpoint."""
    checkpoint = resolve(name_or_path)
    skeleton = build_skeleton(checkpoint, config.dtype)
    model, dtype = skeleton.model, skeleton.dtype
    runtime = new_runtime(model, dtype, config, model_name=str(name_or_path), reading=True)
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

    layout = runtime.survey.layout
    native = layout.format if layout.format in NATIVE_FORMATS else None
    tier = runtime.tier
    cache = _store_cache(checkpoint, runtime)
    if tier is not None:
        assert cache is not None
        tier.use_store(cache)
    with _quiet_transformers_progress(), _dropped_on_failure(cache):
        bar = tqdm(layer_names, desc="Loading experts", unit="layer", disable=not progress)
        for layer, name in enumerate(bar):
            if cache is not None and cache.state == "read":  # every field of the layer: no expert key read
                if tier is not None:  # read from disk as the model runs
                    take_over_experts(model, runtime, layer, name, stored=True)
                else:
                    views = layout.views(cache.read_layer(layer))
                    take_over_experts(model, runtime, layer, name, packed=views)
                continue
            # A checkpoint's own MXFP4/FP8 expert bytes are read as they are; transformers loads the rest.
            kept: list[str] = []
            others: list[str] = []
            for key in by_layer[layer]:
                (kept if native is not None and is_native_key(key, native) else others).append(key)
            info, _ = convert_and_load_state_dict_in_model(model, slices(others), chunk_config("cpu"))
            _raise_on_errors(info, checkpoint)
            packed = None
            if native is not None:
                raw = {key: handle_of[key].get_tensor(key) for key in kept}
                try:
                    packed = pack_layer(native, raw, layout, runtime.survey.num_experts)
                except KeyError as exc:
                    raise CheckpointError(f"checkpoint {checkpoint.directory}: {exc.args[0]}") from None
                packed.update(canonical_biases(model.get_submodule(name), layout))
            take_over_experts(model, runtime, layer, name, packed=packed)  # the disk tier writes it to disk
            if cache is not None and runtime.store is not None:
                cache.write_layer(layer, runtime.store.layer_bytes(layer))
            release_freed_host_memory()
        load_config = chunk_config(runtime.config.device)
        info, _ = convert_and_load_state_dict_in_model(model, slices(rest), load_config)
        info = type(model)._finalize_model_loading(model, load_config, info)
        if tier is not None:
            assert cache is not None
            written = "quantized while loading" if runtime.config.quantize else "written from the checkpoint"
            source = cache.describe("disk store", written)  # before loaded() makes it readable
            tier.loaded()
            runtime.store_source = source
        elif cache is not None:
            cache.commit()
            runtime.store_source = cache.describe("compressed-store cache", _made_how(runtime))
        elif runtime.config.quantize is not None or layout.packing:
            runtime.store_source = f"{_made_how(runtime)} (the store cache is off)"
    _raise_on_errors(info, checkpoint, check_missing=True)
    on_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise CheckpointError(
            f"checkpoint {checkpoint.directory} left {len(on_meta)} tensors unloaded, e.g. {on_meta[0]}"
        )


def _made_how(runtime: OffloadRuntime) -> str:
    quantized = "quantized" if runtime.config.quantize is not None else ""
    packed = "laid out for int4pack" if runtime.survey.layout.packing else ""
    return " and ".join(part for part in (quantized, packed) if part) + " while loading"


def _store_cache(checkpoint: Checkpoint, runtime: OffloadRuntime) -> DiskStore | None:
    """The disk store of this load. With the disk tier, the store the experts live in (any format: a later
    load reads it as it is). Otherwise the compressed-store cache: only experts quantized while loading are
    worth caching, and those laid out for a CPU device's int4pack kernel (float and native formats are read from
    the checkpoint as fast as from a cache)."""
    config, model_survey = runtime.config, runtime.survey
    converted = config.quantize is not None or model_survey.layout.packing  # worth keeping: not a plain read
    if runtime.tier is None and (not converted or not config.store_cache):
        return None
    files = []
    for path in checkpoint.files:
        stat = path.stat()
        files.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    layout = model_survey.layout
    identity = {
        "files": files,
        "format": layout.format,
        "group": layout.group_size,
        "dtype": str(layout.dtype),
    }
    if layout.packing:  # torch's int4pack layout differs between CPU capabilities (and may between versions)
        identity["packing"] = packing_identity(layout)
    root = Path(config.store_dir) if config.store_dir else user_cache_dir("stores")
    store = DiskStore.open(root, identity, layout, model_survey.num_layers, model_survey.num_experts)
    if runtime.tier is not None and store.state == "off":
        raise OffloadError(f"the disk tier cannot keep this model's experts in {root}: see the warning above")
    return store


@contextmanager
def _dropped_on_failure(cache: DiskStore | None):
    """A load that fails leaves no half-written store behind."""
    try:
        yield
    except BaseException:
        if cache is not None:
            cache.abort()
        raise


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
