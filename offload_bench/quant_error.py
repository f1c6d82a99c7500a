"""How far a model with compressed experts is from the same model at full precision, on the same inputs: the
relative error of the first MoE layer's output and of the final logits, and greedy (top-1) agreement.

Every model compared computes in fp32 and shares every weight but the experts' storage, so the first MoE
layer receives identical input in each: its output's error is its own experts' rounding alone. The logits
carry the error of every layer, compounded. Relative error is over all positions of all inputs:
``||out - ref|| / ||ref||`` (Frobenius). Agreement is teacher-forced: at each position of the same input,
whether the two argmaxes name the same token (what greedy decoding would pick next there).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from offload.hf.install import runtime_of


@dataclass
class _Sums:
    layer_err: float = 0.0  # sum of squared differences of the first MoE layer's output
    layer_ref: float = 0.0  # sum of squares of the reference's
    logits_err: float = 0.0
    logits_ref: float = 0.0
    agree: int = 0
    positions: int = 0
    nats: float = 0.0  # when scored: cross-entropy over targets that stand for bytes
    nbytes: int = 0

    def add(
        self, layer: torch.Tensor, layer_ref: torch.Tensor, logits: torch.Tensor, ref: torch.Tensor
    ) -> None:
        self.layer_err += float((layer - layer_ref).double().pow(2).sum())
        self.layer_ref += float(layer_ref.double().pow(2).sum())
        self.logits_err += float((logits - ref).double().pow(2).sum())
        self.logits_ref += float(ref.double().pow(2).sum())
        self.agree += int((logits.argmax(-1) == ref.argmax(-1)).sum())
        self.positions += int(ref.shape[0])

    def row(self) -> dict[str, float | int]:
        out: dict[str, float | int] = {
            "layer_rel_err": math.sqrt(self.layer_err / self.layer_ref),
            "logits_rel_err": math.sqrt(self.logits_err / self.logits_ref),
            "greedy_agreement": self.agree / self.positions,
            "positions": self.positions,
        }
        if self.nbytes:
            out["bits_per_byte"] = self.nats / math.log(2) / self.nbytes
        return out


class _LayerTap:
    """Keeps the last output of one module (the first tensor of a tuple output): ``[B, T, H]``."""

    def __init__(self, module: nn.Module) -> None:
        self.out: torch.Tensor | None = None
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self.out = (output[0] if isinstance(output, tuple) else output).detach().float()

    def remove(self) -> None:
        self._handle.remove()


def first_moe_block(model: nn.Module) -> nn.Module:
    """The MoE block around an offloaded model's first experts module (``model.layers.0.mlp`` for
    ``model.layers.0.mlp.experts``): router, experts and any shared expert, what the decoder layer adds."""
    return model.get_submodule(runtime_of(model).survey.layer_names[0].rpartition(".")[0])


@torch.no_grad()
def compare(
    reference: Any,
    variants: dict[str, Any],
    inputs: Iterable[torch.Tensor],
    nbytes: torch.Tensor | None = None,
) -> dict[str, dict[str, float | int]]:
    """Each variant against ``reference`` (offloaded transformers models, fp32 compute) over ``inputs``, each a
    ``[T + 1]`` int64 window: the model reads its first T tokens. With ``nbytes`` (``[vocab]``: UTF-8 bytes
    each token stands for), bits per byte over the targets too, the reference's included. One row per model,
    the reference's under ``"reference"``."""
    models = {"reference": reference, **variants}
    taps = {name: _LayerTap(first_moe_block(model)) for name, model in models.items()}
    sums = {name: _Sums() for name in models}
    try:
        for window in inputs:
            x = window[None, :-1]  # [1, T]
            target = window[1:]  # [T]
            outputs = {}
            for name, model in models.items():
                logits = model(input_ids=x.to(model.device)).logits[0].float().cpu()  # [T, vocab]
                layer = taps[name].out
                assert layer is not None
                outputs[name] = (layer.reshape(-1, layer.shape[-1]).cpu(), logits)
            layer_ref, ref = outputs["reference"]
            for name, (layer, logits) in outputs.items():
                sums[name].add(layer, layer_ref, logits, ref)
                if nbytes is not None:
                    ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")  # [T]
                    weight = nbytes[target]
                    sums[name].nats += float(ce[weight > 0].double().sum())
                    sums[name].nbytes += int(weight.sum())
    finally:
        for tap in taps.values():
            tap.remove()
    return {name: s.row() for name, s in sums.items()}
