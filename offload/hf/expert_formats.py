"""The format the experts of a load are stored in: the checkpoint's own MXFP4 or FP8 kept as it is, else
``quantize="int4"|"int8"``, else the compute dtype (:func:`with_format`); and the native formats' bytes read
from the checkpoint into the canonical layout.

Experts of MXFP4 (gpt-oss) and fine-grained FP8 (DeepSeek-V3, Qwen3-FP8 style block scales) checkpoints go
from the safetensors file into the host store as they are, rearranged into the canonical layout;
transformers dequantizes only the other weights. ``dequantize=True`` expands them instead, as transformers
would.

Where the checkpoint keeps them:

- MXFP4 (gpt-oss): ``<experts>.gate_up_proj_blocks [E, 2I, H/32, 16]`` (rows alternate gate and up) and
  ``<experts>.gate_up_proj_scales [E, 2I, H/32]``; ``down_proj_blocks [E, H, I/32, 16]``, ``down_proj_scales``.
  Biases are ordinary tensors, loaded by transformers.
- FP8: one key per expert and projection, ``<experts>.<e>.{gate,up,down}_proj.weight`` (``w1, w3, w2`` in
  Mixtral's naming) in e4m3 ``[out, in]`` with ``.weight_scale_inv [ceil(out/b), ceil(in/b)]``. Gate and up
  are stacked into the canonical ``gate_up``, so their scale grids must stack too: kept only when the block
  size divides both dimensions (every real checkpoint); otherwise the experts are dequantized, with a warning.
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from typing import Any

import torch
from transformers import PretrainedConfig

from offload.config import OffloadConfig
from offload.errors import OffloadError
from offload.hf.quantized import quant_method
from offload.kernels.selection import device_layout
from offload.memory.layout import ExpertLayout
from offload.runtime.model_survey import ModelSurvey

log = logging.getLogger(__name__)

_FP8_KEY = re.compile(r"\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight(_scale_inv)?$")
_FP8_ROLE = {
    "gate_proj": "gate",
    "w1": "gate",
    "up_proj": "up",
    "w3": "up",
    "down_proj": "down",
    "w2": "down",
}
_MXFP4_KEY = re.compile(r"\.experts\.(gate_up_proj|down_proj)_(blocks|scales)$")


def with_format(
    model_survey: ModelSurvey, config: OffloadConfig, hf_config: PretrainedConfig | None
) -> ModelSurvey:
    """The survey with the expert layout in the format of this load: the checkpoint's own (``hf_config`` of a
    quantized checkpoint being read), else ``config.quantize``, else the compute dtype; in the packing the
    device's kernel reads (:func:`offload.kernels.selection.device_layout`). Slots are counted in the
    layout's bytes, so this comes before the budget is planned."""
    layout = model_survey.layout
    native = None if hf_config is None else native_format(hf_config, layout, config.dequantize)
    if native is not None and config.quantize is not None:
        raise OffloadError(
            f"the checkpoint's experts are stored in {native[0]} already: quantize applies to full-precision "
            "experts (pass dequantize=True, --dequantize, to quantize the dequantized experts instead)"
        )
    if native is not None:
        layout = replace(layout, format=native[0], group_size=native[1])
    elif config.quantize is not None:
        group = config.quantize_group if config.quantize == "int4" else 0
        layout = replace(layout, format=config.quantize, group_size=group)
    return replace(model_survey, layout=device_layout(layout, config.device, config.kernel))


def native_format(
    hf_config: PretrainedConfig, layout: ExpertLayout, dequantize: bool
) -> tuple[str, int] | None:
    """``(format, group)`` the checkpoint's experts are kept in, or None to load them in the compute dtype."""
    method = quant_method(hf_config)
    if dequantize or method is None:
        return None
    if method == "mxfp4":
        return "mxfp4", 32
    if method == "fp8":
        found = getattr(hf_config, "quantization_config", None)
        block = (
            found.get("weight_block_size")
            if isinstance(found, dict)
            else getattr(found, "weight_block_size", None)
        )
        if not block or block[0] != block[1]:
            log.warning("FP8 experts without square block scales are dequantized to %s", layout.dtype)
            return None
        b = int(block[0])
        if layout.intermediate_size % b or layout.hidden_size % b:
            log.warning(
                "FP8 blocks of %d do not divide the experts' sizes (%d, %d): dequantized to %s",
                b, layout.hidden_size, layout.intermediate_size, layout.dtype,
            )  # fmt: skip
            return None
        return "fp8", b
    return None


def is_native_key(key: str, fmt: str) -> bool:
    """Whether checkpoint key ``key`` holds expert bytes that are kept in format ``fmt``."""
    pattern = _MXFP4_KEY if fmt == "mxfp4" else _FP8_KEY
    return pattern.search(key) is not None


def pack_layer(
    fmt: str, raw: dict[str, torch.Tensor], layout: ExpertLayout, num_experts: int
) -> dict[str, torch.Tensor]:
    """One MoE layer's native expert tensors (checkpoint key -> tensor) -> the layout's weight fields
    ``[E, ...]`` (biases are not among them)."""
    return _pack_mxfp4(raw, layout) if fmt == "mxfp4" else _pack_fp8(raw, layout, num_experts)


def _pack_mxfp4(raw: dict[str, torch.Tensor], layout: ExpertLayout) -> dict[str, torch.Tensor]:
    parts: dict[tuple[str, str], torch.Tensor] = {}
    for key, tensor in raw.items():
        match = _MXFP4_KEY.search(key)
        assert match is not None
        parts[match.group(1), match.group(2)] = tensor
    out = {}
    for proj, name in (("gate_up_proj", "gate_up"), ("down_proj", "down")):
        blocks, scales = parts[proj, "blocks"], parts[proj, "scales"]
        blocks = blocks.reshape(*blocks.shape[:2], -1)  # [E, rows, cols/2]: two codes a byte, in order
        if name == "gate_up" and layout.has_gate and not layout.source_concatenated:
            blocks, scales = _deinterleave(blocks), _deinterleave(scales)  # gpt-oss: gate0, up0, gate1, ...
        out[name], out[f"{name}_scale"] = blocks, scales
    return out


def _deinterleave(rows: torch.Tensor) -> torch.Tensor:
    """``[E, 2I, ...]`` with rows gate0, up0, gate1, up1, ... -> ``[gate rows; up rows]``."""
    return torch.cat((rows[:, 0::2], rows[:, 1::2]), dim=1)


def _pack_fp8(
    raw: dict[str, torch.Tensor], layout: ExpertLayout, num_experts: int
) -> dict[str, torch.Tensor]:
    weights: dict[tuple[int, str], torch.Tensor] = {}
    scales: dict[tuple[int, str], torch.Tensor] = {}
    for key, tensor in raw.items():
        match = _FP8_KEY.search(key)
        assert match is not None
        expert, role = int(match.group(1)), _FP8_ROLE[match.group(2)]
        (scales if match.group(3) else weights)[expert, role] = tensor
    missing = [(e, r) for e in range(num_experts) for r in ("up", "down") if (e, r) not in weights]
    if missing:
        raise KeyError(f"the checkpoint has no FP8 {missing[0][1]} projection for expert {missing[0][0]}")
    gate_up_roles = ("gate", "up") if layout.has_gate else ("up",)

    def stack(roles: tuple[str, ...], table: dict[tuple[int, str], torch.Tensor]) -> torch.Tensor:
        return torch.stack([torch.cat([table[e, r] for r in roles]) for e in range(num_experts)])

    return {
        "gate_up": stack(gate_up_roles, weights),
        "gate_up_scale": stack(gate_up_roles, scales).float(),
        "down": stack(("down",), weights),
        "down_scale": stack(("down",), scales).float(),
    }


def canonical_biases(module: Any, layout: ExpertLayout) -> dict[str, torch.Tensor]:
    """The experts module's biases (loaded by transformers) in the canonical order and the compute dtype."""
    if not layout.has_bias:
        return {}
    gate_up = module.gate_up_proj_bias if layout.has_gate else module.up_proj_bias
    if layout.has_gate and not layout.source_concatenated:
        gate_up = _deinterleave(gate_up)
    return {"gate_up_bias": gate_up.to(layout.dtype), "down_bias": module.down_proj_bias.to(layout.dtype)}
