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
    kv_layer_bytes_per_token: int = 0  # of the layer whose cache grows most per token
    eager_attention_heads: int = 0  # query heads when the model attends eagerly (score matrices), else 0
    unchunked_prefill: str = ""  # why transformers cannot prefill this model in chunks; "" when it can

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    @property
    def total_experts(self) -> int:
        return self.num_layers * self.num_experts

    def workspace_bytes(self, tokens: int, context: int | None = None) -> int:
        """Activations of one ``generate()`` forward over ``tokens`` tokens (batch 1) that attend to up to
        ``context`` positions (None: ``tokens``, a whole prompt; a prefill chunk attends to the chunks before
        it), generously rounded up.

        Counted: the residual stream and attention temporaries (~8 hidden-sized tensors per token); with eager
        attention, the score matrices (three of ``heads x T x (context+1)`` alive at the softmax: raw scores,
        shifted logits, probabilities); the MoE pair buffers (gathered inputs, gate/up output, activation,
        weighted fp32 output for each of k choices); the last token's logits in fp32 (generate() keeps only
        those); the KV cache's growth by concatenation (for a moment, the largest layer's cache, up to ``context`` tokens,
        exists twice);
        64 MiB of allocator slack. (On CUDA the budget planner adds cuBLAS's workspace.)

        Not counted: the full prompt's logits when the model is called directly rather than through
        generate() (T x vocab in the compute dtype: Qwen3 at 4096 tokens, 1.2 GB; pass ``workspace_bytes``
        to cover it); the CUDA context, which lives outside torch's allocator (a few hundred MB: keep
        headroom below the card's size); fragmentation beyond the slack (``max_memory_reserved`` against
        ``max_memory_allocated``, which the GPU check measures).
        """
        layout = self.layout
        context = tokens if context is None else max(context, tokens)
        e, h, i, k = layout.element_size, layout.hidden_size, layout.intermediate_size, self.top_k
        residual = tokens * h * e * 8
        attention = 3 * self.eager_attention_heads * tokens * (context + 1) * e
        moe = tokens * k * ((layout.gate_up_rows + i + h) * e + h * 4)
        logits = self.vocab_size * 4 * 2  # generate() keeps the last token's logits, in fp32, plus softmax
        kv_growth = self.kv_layer_bytes_per_token * context
        return residual + attention + moe + logits + kv_growth + 64 * 2**20
