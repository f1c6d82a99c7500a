"""A checkpoint's model as transformers would build it, on the meta device: class, config, dtype, quantizer.

Nothing is read but the config, so a checkpoint is surveyed and its budget checked before any weight is
(invariant *planned-memory*).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, PretrainedConfig, PreTrainedModel
from transformers.models.auto.auto_factory import _get_model_class

from offload.config import OffloadConfig
from offload.errors import UnsupportedModelError
from offload.hf.architectures import unsupported_message
from offload.hf.checkpoint import Checkpoint, load_config, resolve
from offload.hf.expert_formats import with_format
from offload.hf.quantized import dequantizing_quantizer
from offload.hf.survey import survey
from offload.runtime.model_survey import ModelSurvey

GENERATIVE_AUTO_CLASSES = (AutoModelForCausalLM, AutoModelForImageTextToText)


@dataclass
class Skeleton:
    model: PreTrainedModel  # on the meta device: shapes and names, no memory
    dtype: torch.dtype
    quantizer: Any  # transformers' quantizer, set to dequantize; None for full-precision checkpoints


def build_skeleton(checkpoint: Checkpoint, dtype: torch.dtype | None) -> Skeleton:
    model_class, hf_config = model_class_for(load_config(checkpoint))
    quantizer = dequantizing_quantizer(hf_config)
    # A quantized checkpoint that names no compute dtype gets bf16, what such checkpoints are quantized from.
    dtype = dtype or checkpoint_dtype(hf_config, torch.float32 if quantizer is None else torch.bfloat16)
    with torch.device("meta"):
        model = model_class._from_config(hf_config, dtype=dtype)
    if quantizer is not None:  # as from_pretrained does; dequantizing replaces no module
        quantizer.preprocess_model(model=model, dtype=dtype, device_map=None, checkpoint_files=None)
    return Skeleton(model, dtype, quantizer)


def survey_checkpoint(
    name_or_path: str, dtype: torch.dtype | None = None, config: OffloadConfig | None = None
) -> ModelSurvey:
    """Survey a checkpoint without reading its weights; with ``config``, in the experts' format of that load
    (quantized, or a quantized checkpoint's own), as the budget will count them."""
    skeleton = build_skeleton(resolve(name_or_path), dtype)
    model_survey = survey(skeleton.model, skeleton.dtype)
    return model_survey if config is None else with_format(model_survey, config, skeleton.model.config)


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
