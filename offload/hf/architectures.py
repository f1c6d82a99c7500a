"""Which architectures the runtime takes, read from the installed transformers rather than a hand list.

An architecture is supported when its text-generation class (causal LM, else image-text-to-text) lives in a
modeling module whose experts class uses transformers' experts interface: the runtime replaces those
modules and leaves everything else to transformers. A few such architectures still cannot work, for
reasons listed in :data:`LIMITATIONS`; MoE architectures without the interface are listed as unsupported.
"""

from __future__ import annotations

import functools
import inspect
import sys
from dataclasses import dataclass
from typing import Any

from torch import nn

# Architectures with the experts interface that the runtime still cannot take, and why.
LIMITATIONS: dict[str, str] = {
    "ernie4_5_vl_moe": "its text and vision experts have different sizes; one slot pool holds one expert shape",
    "diffusion_gemma": "its encoder and decoder share (tie) expert weights, which the runtime does not map yet",
}


_MLA = "its latent attention fails over a cache with more than one new token (transformers' sdpa path)"
_MROPE = "transformers' chunked prefill does not carry its multimodal rotary positions"
# Architectures whose prompt transformers (5.17) cannot prefill in chunks, and why: generate() then prefills
# each prompt in one forward, and the budget plans that forward's workspace (offload.runtime.budget).
# tests/offload/hf/test_architectures.py checks each against transformers' own chunked prefill.
UNCHUNKED_PREFILL: dict[str, str] = {
    "axk1": _MLA,
    "deepseek_v2": _MLA,
    "deepseek_v3": _MLA,
    "glm4_moe_lite": _MLA,
    "kimi_linear": _MLA,
    "mistral4": _MLA,
    "glm4v_moe": _MROPE,
    "qwen3_omni_moe_thinker": _MROPE,
    "qwen3_vl_moe": _MROPE,
    "minimax": "it keeps a cache of its own, which transformers' chunked prefill does not take",
    "jamba": "its Mamba layers continue a cache exactly one token at a time: chunks change its outputs",
}


@dataclass(frozen=True)
class Architecture:
    model_type: str
    model_class: str  # the class offload builds: ...ForCausalLM or ...ForConditionalGeneration
    experts_classes: tuple[str, ...]  # experts-interface classes in its modeling module ("" if none)
    limitation: str = ""  # why it cannot work, empty when supported

    @property
    def supported(self) -> bool:
        return bool(self.experts_classes) and not self.limitation


def experts_interface_classes(model_class: type) -> tuple[str, ...]:
    """Experts classes of ``model_class``'s modeling module that use the experts interface: their
    ``forward`` is the wrapper ``transformers.integrations.moe.use_experts_implementation`` installs."""
    from transformers.integrations import moe

    module = sys.modules.get(model_class.__module__)
    if module is None:  # a class defined outside a loaded modeling module
        return ()
    return tuple(
        name
        for name, obj in vars(module).items()
        if inspect.isclass(obj)
        and issubclass(obj, nn.Module)
        and getattr(getattr(obj, "forward", None), "__code__", None) is not None
        and obj.forward.__code__.co_filename == moe.__file__
    )


@functools.cache
def architectures() -> tuple[Architecture, ...]:
    """Every MoE architecture of the installed transformers, supported or not, sorted by model type."""
    from transformers.models.auto import modeling_auto

    found: dict[str, Architecture] = {}
    generative = (
        modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING,
        modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING,
    )
    for mapping in generative:
        for model_type in mapping._model_mapping:
            model_class = None if model_type in found else _model_class(mapping, model_type)
            if model_class is None:
                continue
            experts = experts_interface_classes(model_class)
            if experts:
                limitation = LIMITATIONS.get(model_type, "")
            elif _declares_experts(model_type):
                limitation = "its experts module does not use transformers' experts interface"
            else:
                continue  # a dense model
            found[model_type] = Architecture(model_type, model_class.__name__, experts, limitation)
    # Experts-interface models with no text-generation class (token classifiers, speech output, ...), leaving
    # out the towers of models listed above (their text and vision sub-configs share the modeling module).
    parts = {sub for a in found.values() for sub in _sub_config_types(a.model_type)}
    for model_type in modeling_auto.MODEL_MAPPING._model_mapping:
        if model_type in found or model_type in parts:
            continue
        base = _model_class(modeling_auto.MODEL_MAPPING, model_type)
        experts = experts_interface_classes(base) if base is not None else ()
        if base is not None and experts and _declares_experts(model_type):
            reason = "transformers has no text-generation class for it (causal LM or image-text-to-text)"
            found[model_type] = Architecture(model_type, base.__name__, experts, reason)
    return tuple(sorted(found.values(), key=lambda a: a.model_type))


def _model_class(mapping: Any, model_type: str) -> Any:
    """The class an auto mapping gives ``model_type``, or None where it gives none here."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        return None
    try:
        model_class = mapping[CONFIG_MAPPING[model_type]]
    except (KeyError, ImportError, AttributeError, ValueError):  # an entry this install cannot resolve
        return None
    return model_class[0] if isinstance(model_class, tuple) else model_class


def supported_model_types() -> list[str]:
    return [a.model_type for a in architectures() if a.supported]


def unsupported_message(model_type: str, why: str) -> str:
    """One line: why ``model_type`` cannot run, and what can."""
    known = {a.model_type: a for a in architectures()}
    if model_type in known and known[model_type].limitation:
        why = known[model_type].limitation
    return (
        f"model type {model_type!r} is not supported: {why}; supported: {', '.join(supported_model_types())}"
    )


def _sub_config_types(model_type: str) -> set[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    subs = getattr(CONFIG_MAPPING[model_type], "sub_configs", None) or {}
    return {str(getattr(c, "model_type", "")) for c in subs.values()}


def _declares_experts(model_type: str) -> bool:
    """A config whose defaults describe more than one routed expert (configs are cheap to build)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        config = CONFIG_MAPPING[model_type]()
        text = config.get_text_config()
    except Exception:  # some configs cannot be built without arguments: not ours to judge
        return False
    for name in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 1:
            return True
    return False


def describe() -> str:
    """The text of ``offload-run --list-architectures``."""
    archs = architectures()
    supported = [a for a in archs if a.supported]
    lines = [f"Supported ({len(supported)} model types, from the installed transformers):"]
    width = max(len(a.model_type) for a in archs)
    for a in supported:
        lines.append(f"  {a.model_type:<{width}}  {a.model_class} ({', '.join(a.experts_classes)})")
    lines.append("")
    lines.append("Not supported:")
    for a in archs:
        if not a.supported:
            lines.append(f"  {a.model_type:<{width}}  {a.limitation}")
    return "\n".join(lines)
