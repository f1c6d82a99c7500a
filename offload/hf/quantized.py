"""Checkpoints whose weights are stored quantized: dequantized to the compute dtype while loading, or refused.

MXFP4 (gpt-oss) and fine-grained FP8 (DeepSeek-V3, Qwen3-FP8: 8-bit floats with block scales) are
dequantized by transformers' own quantizers, whose conversion ops then run inside the layer-by-layer load,
so the host store holds ordinary compute-dtype experts. Every other method is refused by name: the runtime
never computes on weights it cannot read.
"""

from __future__ import annotations

from typing import Any

from transformers import FineGrainedFP8Config, PretrainedConfig
from transformers.quantizers.auto import get_hf_quantizer
from transformers.utils.quantization_config import Mxfp4Config

from offload.errors import UnsupportedModelError

# quant_method -> the config that asks transformers to dequantize while loading
DEQUANTIZERS: dict[str, Any] = {
    "mxfp4": lambda: Mxfp4Config(dequantize=True),
    "fp8": lambda: FineGrainedFP8Config(dequantize=True),
}


def quant_method(hf_config: PretrainedConfig) -> str | None:
    found = getattr(hf_config, "quantization_config", None) or getattr(
        hf_config.get_text_config(), "quantization_config", None
    )
    if found is None:
        return None
    method = found.get("quant_method") if isinstance(found, dict) else getattr(found, "quant_method", None)
    return str(getattr(method, "value", method))


def dequantizing_quantizer(hf_config: PretrainedConfig) -> Any:
    """transformers' quantizer set to dequantize this checkpoint, None for a full-precision one.

    Updates ``hf_config.quantization_config`` as ``from_pretrained`` does.
    """
    method = quant_method(hf_config)
    if method is None:
        return None
    if method not in DEQUANTIZERS:
        raise UnsupportedModelError(
            f"the checkpoint's weights are quantized with {method!r}, which moe-offload cannot read; it loads "
            f"full-precision checkpoints and dequantizes {' and '.join(sorted(DEQUANTIZERS))} ones"
        )
    quantizer, _, _ = get_hf_quantizer(hf_config, DEQUANTIZERS[method](), None, True, None)
    return quantizer
