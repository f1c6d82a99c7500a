"""What the runtime needs to know about a model: its MoE layers, expert layout and fixed device costs.

Built from a transformers model by :func:`offload.hf.survey.survey`; plain data from here on.
"""

from __future__ import annotations

from dataclasses import dataclass

from offload.memory.layout import ExpertLayout


@dataclass(frozen=True)
class ModelSurvey:
    model_type: str
    layer_names: tuple[str, ...]  # qualified names of the experts modules, one per MoE layer
    num_experts: int
    top_k: int
    layout: ExpertLayout
    resident_bytes: int  # everything that stays on the device: all but the routed experts
    kv_bytes_per_token: int
    vocab_size: int
    kv_measured: bool = True  # False: the KV bytes come from a config formula, not from the model's own cache

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    @property
    def total_experts(self) -> int:
        return self.num_layers * self.num_experts

    def workspace_bytes(self, tokens: int) -> int:
        """Activations of one forward over ``tokens`` tokens (batch 1), generously rounded up.

        Residual stream and attention temporaries (~8 hidden-sized tensors per token), the MoE pair buffers
        (gathered inputs, gate/up output, activation, weighted fp32 output for each of k choices), last-token
        logits in fp32, and 64 MiB of allocator slack.
        """
        layout = self.layout
        e, h, i, k = layout.element_size, layout.hidden_size, layout.intermediate_size, self.top_k
        residual = tokens * h * e * 8
        moe = tokens * k * ((layout.gate_up_rows + i + h) * e + h * 4)
        logits = self.vocab_size * 4 * 2  # generate() keeps the last token's logits, in fp32, plus softmax
        return residual + moe + logits + 64 * 2**20
