"""What each preset in ``configs/`` buys: its checkpoint's shape on the meta device, surveyed and planned by
the runtime's own code (``offload.hf.survey``, ``offload.runtime.budget``) at the preset's budget, context
and cache scope. Nothing is downloaded or allocated: the shapes come from transformers' config classes with
each checkpoint's config.json values where the defaults differ.

The figures the presets' comments quote (slots, share of experts, host RAM) come from here; a test checks
that every preset's "Plan:" line still says what the planner computes.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import transformers

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
PLAN_LINE = re.compile(r"^# Plan: .*?(\d+) of (\d+) expert slots", re.MULTILINE)


def _mixtral() -> transformers.PretrainedConfig:
    from offload_bench.shapes import SHAPES

    return SHAPES["mixtral-8x7b"].config()


def _qwen3() -> transformers.PretrainedConfig:
    from offload_bench.shapes import SHAPES

    return SHAPES["qwen3-30b-a3b"].config()


def _olmoe() -> transformers.PretrainedConfig:
    from offload_bench.shapes import SHAPES

    return SHAPES["olmoe-1b-7b"].config()


def _gpt_oss(layers: int, experts: int) -> Callable[[], transformers.PretrainedConfig]:
    def build() -> transformers.PretrainedConfig:
        import transformers

        # GptOssConfig() is openai/gpt-oss-120b (36 layers x 128 experts, top-4, hidden 2880); gpt-oss-20b
        # differs only in depth and experts (24 x 32). The MXFP4 experts are dequantized to bf16 at load.
        return transformers.GptOssConfig(num_hidden_layers=layers, num_local_experts=experts)

    return build


def _deepseek_v2_lite() -> transformers.PretrainedConfig:
    import transformers

    # DeepseekV2Config's defaults are not this checkpoint: deepseek-ai/DeepSeek-V2-Lite's config.json.
    return transformers.DeepseekV2Config(
        hidden_size=2048,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        num_hidden_layers=27,
        num_attention_heads=16,
        num_key_value_heads=16,
        n_routed_experts=64,
        n_shared_experts=2,
        num_experts_per_tok=6,
        first_k_dense_replace=1,
        kv_lora_rank=512,
        q_lora_rank=None,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_group=1,
        topk_group=1,
        topk_method="greedy",
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        vocab_size=102400,
        max_position_embeddings=163840,
    )


CHECKPOINTS: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    "mistralai/Mixtral-8x7B-Instruct-v0.1": _mixtral,
    "Qwen/Qwen3-30B-A3B": _qwen3,
    "openai/gpt-oss-20b": _gpt_oss(24, 32),
    "openai/gpt-oss-120b": _gpt_oss(36, 128),
    "deepseek-ai/DeepSeek-V2-Lite-Chat": _deepseek_v2_lite,
    "allenai/OLMoE-1B-7B-0924-Instruct": _olmoe,
}


def presets() -> list[Path]:
    """The model presets (the sweep grids live in configs/sweeps/)."""
    return sorted(CONFIGS.glob("*.toml"))


@functools.cache
def checkpoint_survey(model: str) -> Any:
    """The runtime's survey of ``model``'s shape in bf16, on the meta device (a few seconds; cached)."""
    import torch

    from offload_bench.synthetic import shape_survey

    return shape_survey(CHECKPOINTS[model](), torch.bfloat16)


def plan_preset(path: Path) -> dict[str, Any]:
    """The preset read as offload-serve reads it (defaults included), planned for its checkpoint's shape."""
    from offload.cli.serve import build_parser
    from offload.config import OffloadConfig
    from offload.runtime.budget import plan_budget

    args = build_parser().parse_args(["--config", str(path)])
    survey = checkpoint_survey(args.model)
    config = OffloadConfig.create(
        args.vram_budget,
        device="cpu",
        dtype="bf16",
        max_context=args.max_context,
        cache_scope=args.cache_scope,
    )
    plan = plan_budget(survey, config)
    return dict(
        preset=path.name,
        model=args.model,
        vram_budget=args.vram_budget,
        budget_bytes=plan.budget_bytes,
        max_context=args.max_context,
        cache_scope=args.cache_scope,
        policy=args.policy,
        layers=survey.num_layers,
        experts_per_layer=survey.num_experts,
        top_k=survey.top_k,
        expert_bytes=plan.expert_bytes,
        resident_bytes=plan.resident_bytes,
        kv_cache_bytes=plan.kv_cache_bytes,
        workspace_bytes=plan.workspace_bytes,
        slots=plan.slots,
        total_experts=plan.total_experts,
        slot_fraction=plan.slots / plan.total_experts,
        host_store_bytes=plan.total_experts * plan.expert_bytes,
    )


def stated_plan(path: Path) -> tuple[int, int] | None:
    """``(slots, experts)`` from the preset's ``# Plan: ... N of M expert slots`` comment."""
    found = PLAN_LINE.search(path.read_text())
    return (int(found.group(1)), int(found.group(2))) if found else None


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| preset | budget | context | scope | policy | slots / experts | resident | KV | workspace | host store |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['preset']}` | {r['vram_budget']} | {r['max_context']} | {r['cache_scope']} | {r['policy']} | "
            f"{r['slots']} / {r['total_experts']} ({r['slot_fraction']:.0%}) | {r['resident_bytes'] / 1e9:.1f} GB | "
            f"{r['kv_cache_bytes'] / 1e9:.2f} GB | {r['workspace_bytes'] / 1e9:.2f} GB | "
            f"{r['host_store_bytes'] / 1e9:.1f} GB |"
        )
    return "\n".join(lines)


def main() -> int:
    """Print the presets' table (configs/README.md quotes it)."""
    print(table([plan_preset(path) for path in presets()]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
