"""Survey a transformers model into what the runtime needs to know (:class:`ModelSurvey`): its MoE layers,
expert layout and fixed costs.

Works on a meta-device skeleton (nothing loaded yet, so the budget is checked before any byte is read,
invariant *planned-memory*) and on a model already in memory.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from offload.errors import UnsupportedModelError
from offload.hf.architectures import UNCHUNKED_PREFILL, unsupported_message
from offload.memory.layout import ExpertLayout
from offload.runtime.model_survey import ModelSurvey

log = logging.getLogger(__name__)

# Attributes that `transformers.integrations.moe.use_experts_implementation` sets on every experts module.
_EXPERTS_FLAGS = ("has_gate", "has_bias", "is_transposed", "is_concatenated")
_TOP_K_NAMES = (
    "num_experts_per_tok",
    "moe_topk",
    "moe_k",
    "top_k",
    "top_k_experts",
    "num_selected_experts",
    "experts_per_token",
)
_NUM_EXPERTS_NAMES = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def is_experts_module(module: nn.Module) -> bool:
    """True for modules whose class uses transformers' experts interface (``@use_experts_implementation``)."""
    return all(hasattr(module, flag) for flag in _EXPERTS_FLAGS) and hasattr(module, "num_experts")


def experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every experts module, in forward order."""
    return [(name, m) for name, m in model.named_modules() if is_experts_module(m)]


def expert_param_names(layout: ExpertLayout) -> tuple[str, ...]:
    names = ["gate_up_proj" if layout.has_gate else "up_proj", "down_proj"]
    if layout.has_bias:
        names += [n + "_bias" for n in names]
    return tuple(names)


def survey(model: PreTrainedModel, dtype: torch.dtype) -> ModelSurvey:
    """Inspect ``model`` (meta or real). Raises UnsupportedModelError for dense or unsupported models."""
    config = model.config
    found = experts_modules(model)
    if not found:
        if _num_experts(config) > 1:
            raise UnsupportedModelError(
                unsupported_message(
                    config.model_type, "its experts module does not use transformers' experts interface"
                )
            )
        raise UnsupportedModelError(
            f"model type {config.model_type!r} is a dense model (no MoE layers): there are no experts to offload; "
            "load it with transformers directly"
        )
    kv_bytes, kv_layer_bytes, measured = kv_bytes_per_token(type(model), config, dtype)
    experts_names = {name for name, _ in found}
    tied = [
        t
        for t in (getattr(model, "all_tied_weights_keys", None) or {})
        if t.rpartition(".")[0] in experts_names
    ]
    if tied:
        raise UnsupportedModelError(
            unsupported_message(config.model_type, f"it ties expert weights between modules (e.g. {tied[0]})")
        )
    layouts = {_layout(m, dtype) for _, m in found}
    counts = {int(m.num_experts) for _, m in found}  # type: ignore[arg-type]
    if len(layouts) > 1 or len(counts) > 1:
        raise UnsupportedModelError(
            unsupported_message(config.model_type, "its MoE layers have experts of different shapes")
        )
    layout = layouts.pop()
    return ModelSurvey(
        model_type=config.model_type,
        layer_names=tuple(name for name, _ in found),
        num_experts=counts.pop(),
        top_k=_top_k(config, model, found[0][0]),
        layout=layout,
        resident_bytes=_resident_bytes(model, experts_names, dtype),
        kv_bytes_per_token=kv_bytes,
        vocab_size=int(getattr(config.get_text_config(), "vocab_size", 0) or 0),
        kv_measured=measured,
        kv_layer_bytes_per_token=kv_layer_bytes,
        eager_attention_heads=_eager_heads(config),
        unchunked_prefill=UNCHUNKED_PREFILL.get(config.model_type, ""),
    )


def _eager_heads(config: PretrainedConfig) -> int:
    """Query heads when the model attends eagerly (score matrices in memory), else 0."""
    if getattr(config, "_attn_implementation", None) != "eager":
        return 0
    return int(getattr(config.get_text_config(), "num_attention_heads", 0) or 0)


def _layout(module: nn.Module, dtype: torch.dtype) -> ExpertLayout:
    has_gate = bool(module.has_gate)
    first: torch.Tensor = module.gate_up_proj if has_gate else module.up_proj  # type: ignore[assignment]
    down: torch.Tensor = module.down_proj  # type: ignore[assignment]
    # first: [E, G*I, H] ([E, H, G*I] if transposed); down: [E, H, I] ([E, I, H] if transposed)
    transposed = bool(module.is_transposed)
    hidden = first.shape[1] if transposed else first.shape[2]
    intermediate = down.shape[1] if transposed else down.shape[2]
    return ExpertLayout(
        hidden_size=int(hidden),
        intermediate_size=int(intermediate),
        has_gate=has_gate,
        has_bias=bool(module.has_bias),
        dtype=dtype,
        source_concatenated=bool(module.is_concatenated),
        source_transposed=transposed,
    )


def _num_experts(config: PretrainedConfig) -> int:
    text = config.get_text_config()
    for name in _NUM_EXPERTS_NAMES:
        value = getattr(text, name, None)
        if isinstance(value, int):
            return value
    return 0


def _top_k(config: PretrainedConfig, model: nn.Module, experts_name: str) -> int:
    text = config.get_text_config()
    for name in _TOP_K_NAMES:
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    # Fall back to the router living beside the experts module (block.gate.top_k or block.top_k).
    block = model.get_submodule(experts_name.rpartition(".")[0])
    for owner in (block, *block.children()):
        value = getattr(owner, "top_k", None)
        if isinstance(value, int) and value > 0:
            return value
    raise UnsupportedModelError(f"cannot tell how many experts each token uses in {config.model_type!r}")


def _resident_bytes(model: nn.Module, experts_names: set[str], dtype: torch.dtype) -> int:
    """Bytes of every parameter and buffer outside the experts modules, tied weights counted once.

    Floating-point tensors are counted at ``dtype``, the dtype they will have on the device.
    """
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    prefixes = tuple(name + "." for name in experts_names)
    seen: set[int] = set()
    total = 0
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]:
        if name.startswith(prefixes) or name in tied or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        size = (
            torch.empty((), dtype=dtype).element_size()
            if tensor.is_floating_point()
            else tensor.element_size()
        )
        total += tensor.numel() * size
    return total


def kv_bytes_per_token(
    model_class: type[PreTrainedModel], config: PretrainedConfig, dtype: torch.dtype
) -> tuple[int, int, bool]:
    """KV-cache bytes one token adds in all, in the largest layer, and whether they were measured.

    Measured: the model is built on the meta device and its decoder run over 4 and 12 tokens; the growth of
    its own cache tensors (whatever they hold: full keys and values, MLA latents, indexer keys, nothing for
    linear-attention or Mamba layers) is the answer, with no memory used. Where the model cannot run on the
    meta device (data-dependent ops), a config formula stands in and ``measured`` is False.
    """
    # The meta run takes a quarter of a second or more, and one config is surveyed more than once (the CLI's
    # budget check before the load surveys it too): the answer is kept per class, config and dtype.
    key = (model_class, config.to_json_string(use_diff=False), dtype)
    if key not in _KV_MEASURED:
        try:
            _KV_MEASURED[key] = (*_measure_kv_bytes_per_token(model_class, config, dtype), None)
        except Exception as exc:  # any failure of a foreign forward on meta: fall back to the formula
            _KV_MEASURED[key] = (*_kv_formula(config, dtype), str(exc))
    total, largest, failure = _KV_MEASURED[key]
    if failure is not None:
        log.warning(
            "KV cache of %s estimated from its config (meta run failed: %s)", config.model_type, failure
        )
    return total, largest, failure is None


_KV_MEASURED: dict[tuple[type[PreTrainedModel], str, torch.dtype], tuple[int, int, str | None]] = {}


def _measure_kv_bytes_per_token(
    model_class: type[PreTrainedModel], config: PretrainedConfig, dtype: torch.dtype
) -> tuple[int, int]:
    config = copy.deepcopy(config)
    config._experts_implementation = "batched_mm"  # indexing only: runs on meta, unlike grouped_mm's histc
    with torch.device("meta"):
        model = model_class._from_config(config, dtype=dtype)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    sizes = []
    for tokens in (4, 12):
        ids = torch.zeros((1, tokens), dtype=torch.long, device="meta")
        with torch.no_grad():
            cache = decoder(input_ids=ids, use_cache=True).past_key_values
        layers = getattr(cache, "layers", None)
        if layers is None:
            raise TypeError(f"unknown cache type {type(cache).__name__}")
        sizes.append(
            [
                sum(t.numel() * t.element_size() for t in vars(layer).values() if torch.is_tensor(t))
                for layer in layers
            ]
        )
    growth = [(after - before) // 8 for before, after in zip(sizes[0], sizes[1], strict=True)]
    return sum(growth), max(growth, default=0)


def _kv_formula(config: PretrainedConfig, dtype: torch.dtype) -> tuple[int, int]:
    """Standard and latent attention from the config: full keys and values, the MLA latent for
    ``kv_lora_rank`` models; linear-attention, Mamba and convolution layers add nothing per token."""
    text = config.get_text_config()
    element = torch.empty((), dtype=dtype).element_size()
    layers = int(text.num_hidden_layers)
    layer_types = list(getattr(text, "layer_types", None) or [])
    per_layer = getattr(text, "per_layer_config", None)
    per_token = []
    for i in range(layers):
        kind = str(layer_types[i]) if i < len(layer_types) else "attention"
        if "attention" not in kind or "linear" in kind:
            continue
        per_token.append(_kv_values_per_token(per_layer[i] if per_layer is not None else text) * element)
    return sum(per_token), max(per_token, default=0)


def _kv_values_per_token(layer_config: PretrainedConfig) -> int:
    if getattr(layer_config, "kv_lora_rank", None):  # multi-head latent attention caches the latent
        return int(layer_config.kv_lora_rank) + int(layer_config.qk_rope_head_dim)
    heads = int(getattr(layer_config, "num_attention_heads", 0) or 0)
    kv_heads = int(getattr(layer_config, "num_key_value_heads", None) or heads)
    head_dim = getattr(layer_config, "head_dim", None) or (layer_config.hidden_size // max(heads, 1))
    return 2 * kv_heads * int(head_dim)
