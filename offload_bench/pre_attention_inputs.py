"""Which input a pre-attention guess should give layer l's router, measured on a plain transformers model.

The router is trained on ``norm(x + attention(x))`` (``norm``: the decoder layer's norm in front of the MoE
block, ``x``: the residual stream entering the layer); before the attention only ``x`` exists. Candidates:

- ``post_attention_norm``: ``norm(x)``, the router's own norm without the attention's update (what the
  runtime's pre-attention predictor uses);
- ``input_norm``: ``input_layernorm(x)``, the tensor the attention itself reads;
- ``raw``: ``x`` unnormalized;
- ``lookahead``: for comparison, layer l's router on layer l-1's MoE input (the runtime's lookahead; nothing
  for layer 0).

Per token, recall = |guessed top-k ∩ used top-k| / k (a token's guess and its use both have k experts, so
precision is the same number). Full windows are run at once: attention is causal, so each token's routing is
the one it gets in token-by-token decoding.
"""

from __future__ import annotations

from typing import Any

import torch

CANDIDATES = ("post_attention_norm", "input_norm", "raw", "lookahead")


def _topk(router: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return router.forward(hidden.reshape(-1, hidden.shape[-1]))[2]  # [T, k]: (logits, weights, ids)


def _overlap(guess: torch.Tensor, used: torch.Tensor) -> int:
    """Sum over tokens of |guess_t ∩ used_t| for ``[T, k]`` id tensors."""
    return int((guess[:, :, None] == used[:, None, :]).any(-1).sum())


@torch.no_grad()
def measure(model: Any, windows: list[torch.Tensor]) -> dict[str, Any]:
    """Per-layer and overall recall of each candidate over the tokens of ``windows`` (a Qwen3-MoE-style
    decoder: ``layer.input_layernorm``, ``layer.post_attention_layernorm``, ``layer.mlp.gate``)."""
    layers = model.model.layers
    entering: dict[int, torch.Tensor] = {}
    moe_input: dict[int, torch.Tensor] = {}
    used: dict[int, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(
            layer.register_forward_pre_hook(
                lambda m, a, kw, i=i: entering.__setitem__(i, a[0] if a else kw["hidden_states"]),
                with_kwargs=True,
            )
        )
        hooks.append(layer.mlp.register_forward_pre_hook(lambda m, a, i=i: moe_input.__setitem__(i, a[0])))
        hooks.append(layer.mlp.gate.register_forward_hook(lambda m, a, out, i=i: used.__setitem__(i, out[2])))
    hits = {c: [0] * len(layers) for c in CANDIDATES}
    needed = [0] * len(layers)
    try:
        for window in windows:
            model(input_ids=window[None].to(model.device))
            for i, layer in enumerate(layers):
                x, real = entering[i], used[i]
                guesses = {
                    "post_attention_norm": _topk(layer.mlp.gate, layer.post_attention_layernorm.forward(x)),
                    "input_norm": _topk(layer.mlp.gate, layer.input_layernorm.forward(x)),
                    "raw": _topk(layer.mlp.gate, x),
                }
                if i > 0:
                    guesses["lookahead"] = _topk(layer.mlp.gate, moe_input[i - 1])
                for name, guess in guesses.items():
                    hits[name][i] += _overlap(guess, real)
                needed[i] += real.numel()
    finally:
        for hook in hooks:
            hook.remove()
    out: dict[str, Any] = {"tokens": needed[0] // layers[0].mlp.gate.top_k, "candidates": {}}
    for name in CANDIDATES:
        scored = range(1 if name == "lookahead" else 0, len(layers))
        out["candidates"][name] = {
            "recall": sum(hits[name][i] for i in scored) / sum(needed[i] for i in scored),
            "per_layer": [hits[name][i] / needed[i] if i in scored else None for i in range(len(layers))],
        }
    return out
