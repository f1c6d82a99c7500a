"""What each preset in ``configs/`` buys: its checkpoint's shape on the meta device, surveyed and planned by
the runtime's own code (``offload.hf.survey``, ``offload.hf.expert_formats.with_format``,
``offload.runtime.budget``) at the preset's budget, context, cache scope and expert format, as on a CUDA card.
Nothing is downloaded or allocated: the shapes come from transformers' config classes with each checkpoint's
config.json values where the defaults differ (its ``quantization_config`` included, so gpt-oss is planned in
its native MXFP4 as a load keeps it).

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
        # differs only in depth and experts (24 x 32). Both checkpoints store their experts in MXFP4, which a
        # load keeps unless --dequantize is given.
        config = transformers.GptOssConfig(num_hidden_layers=layers, num_local_experts=experts)
        config.quantization_config = {"quant_method": "mxfp4"}  # as the checkpoints' config.json says
        return config

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


def _qwen3_235b() -> transformers.PretrainedConfig:
    import transformers

    # Qwen/Qwen3-235B-A22B's config.json: 94 layers x 128 experts, top-8, hidden 4096, moe_intermediate 1536,
    # 64 heads, 4 KV heads, head_dim 128.
    options: dict[str, Any] = dict(
        hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536, num_hidden_layers=94,
        num_attention_heads=64, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, vocab_size=151936, max_position_embeddings=40960,
    )  # fmt: skip
    return transformers.Qwen3MoeConfig(**options)


def _glm45_air() -> transformers.PretrainedConfig:
    import transformers

    # Glm4MoeConfig's defaults are zai-org/GLM-4.5-Air's shape (46 layers, the first dense, 128 experts top-8,
    # moe_intermediate 1408, hidden 4096) but leave head_dim to hidden / heads; the checkpoint's is 128.
    options: dict[str, Any] = dict(head_dim=128)
    return transformers.Glm4MoeConfig(**options)


CHECKPOINTS: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    "mistralai/Mixtral-8x7B-Instruct-v0.1": _mixtral,
    "Qwen/Qwen3-30B-A3B": _qwen3,
    "openai/gpt-oss-20b": _gpt_oss(24, 32),
    "openai/gpt-oss-120b": _gpt_oss(36, 128),
    "deepseek-ai/DeepSeek-V2-Lite-Chat": _deepseek_v2_lite,
    "allenai/OLMoE-1B-7B-0924-Instruct": _olmoe,
    "Qwen/Qwen3-235B-A22B": _qwen3_235b,
    "zai-org/GLM-4.5-Air": _glm45_air,
}
TARGET_TOK_S = 5.0  # the decode speed the disk presets state the NVMe rate for


def presets() -> list[Path]:
    """The model presets (the sweep grids live in configs/sweeps/)."""
    return sorted(CONFIGS.glob("*.toml"))


def is_disk_preset(path: Path) -> bool:
    """``<model>-<card>gb-<ram>gb-ram.toml``: a model larger than the machine's RAM, on the disk tier."""
    return path.stem.endswith("-ram")


@functools.cache
def checkpoint_survey(model: str) -> Any:
    """The runtime's survey of ``model``'s shape with bf16 experts, on the meta device (a few seconds;
    cached)."""
    import torch

    from offload_bench.synthetic import shape_survey

    return shape_survey(CHECKPOINTS[model](), torch.bfloat16)


# Host RAM beyond the store and the layer being loaded: the Python process with torch, transformers and the
# CUDA runtime, the tokenizer, the server (a few GB; an allowance, not measured per model).
PROCESS_BYTES = 4 * 10**9
# Common machines' RAM, GB: a preset names the smallest that holds what it needs and 2 GB for the OS.
RAM_SIZES_GB = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512)
OS_BYTES = 2 * 10**9


def plan_preset(path: Path) -> dict[str, Any]:
    """The preset read as offload-serve reads it (defaults included), planned for its checkpoint's shape."""
    from dataclasses import replace

    import torch

    from offload.cli.serve import build_parser
    from offload.config import OffloadConfig
    from offload.hf.expert_formats import with_format
    from offload.runtime.budget import plan_budget

    args = build_parser().parse_args(["--config", str(path)])
    bf16 = checkpoint_survey(args.model)
    config = OffloadConfig.create(
        args.vram_budget,
        device="cpu",
        dtype="bf16",
        max_context=args.max_context,
        prefill_chunk=args.prefill_chunk,
        cache_scope=args.cache_scope,
        quantize=None if args.quantize == "none" else args.quantize,
        quantize_group=args.quantize_group,
        dequantize=args.dequantize,
    )
    # Planned as offload-serve plans it on the card (cuBLAS's workspace counted), without needing one here.
    config = replace(config, device=torch.device("cuda"))
    survey = with_format(bf16, config, CHECKPOINTS[args.model]())
    plan = plan_budget(survey, config)
    store = plan.total_experts * plan.expert_bytes
    # Peak host RAM of the load: the store so far plus one layer's experts as the checkpoint gives them (the
    # full-precision layer a quantized load packs, or the native MXFP4 layer), plus the process.
    quantized = survey.layout.format in ("int4", "int8")
    loading = survey.num_experts * (bf16.layout.nbytes if quantized else plan.expert_bytes)
    host_ram = store + loading + PROCESS_BYTES
    disk = _disk_tier(survey, config, args.host_memory_limit, plan.slots) if args.host_memory_limit else {}
    return dict(
        **disk,
        preset=path.name,
        model=args.model,
        vram_budget=args.vram_budget,
        budget_bytes=plan.budget_bytes,
        max_context=args.max_context,
        prefill_chunk=plan.prefill_chunk,
        cache_scope=args.cache_scope,
        policy=args.policy,
        layers=survey.num_layers,
        experts_per_layer=survey.num_experts,
        top_k=survey.top_k,
        expert_format=survey.layout.format_name,
        expert_bytes=plan.expert_bytes,
        bf16_expert_bytes=bf16.layout.nbytes,
        resident_bytes=plan.resident_bytes,
        kv_cache_bytes=plan.kv_cache_bytes,
        workspace_bytes=plan.workspace_bytes,
        slots=plan.slots,
        total_experts=plan.total_experts,
        slot_fraction=plan.slots / plan.total_experts,
        host_store_bytes=store,
        layer_load_bytes=loading,
        host_ram_bytes=host_ram,
        machine_ram_gb=next((gb for gb in RAM_SIZES_GB if gb * 10**9 >= host_ram + OS_BYTES), None),
    )


def _disk_tier(survey: Any, config: Any, limit: str, device_slots: int) -> dict[str, Any]:
    """A disk preset (``host-memory-limit`` below its store): the host slots the runtime's host plan gives,
    and the disk bytes per token at hit rates equal to each tier's share of the experts (what random access
    gives; trained routing does better), with the NVMe rate that makes that ``TARGET_TOK_S`` tokens/s."""
    from dataclasses import replace

    from offload.memory.disk_store import row_stride
    from offload.runtime.host_plan import plan_disk_tier, plan_host
    from offload.units import parse_size

    limit_bytes = parse_size(limit)
    in_ram = plan_host(survey, 0)
    assert in_ram.total_bytes > limit_bytes, (
        f"every expert fits {limit}: the runtime would not keep them on disk"
    )
    tier, fits = plan_disk_tier(survey, replace(config, host_memory_limit=limit_bytes), in_ram, limit_bytes)
    assert fits and tier.host_tier_slots is not None, f"{limit} holds less than the disk tier's minimum"
    total = survey.total_experts
    device_share, ram_share = device_slots / total, tier.host_tier_slots / total
    reads = survey.num_layers * survey.top_k * (1 - device_share) * (1 - ram_share)
    per_token = reads * row_stride(survey.layout)
    return dict(
        host_memory_limit=limit,
        host_memory_limit_bytes=limit_bytes,
        host_tier_slots=tier.host_tier_slots,
        host_tier_fraction=ram_share,
        host_tier_ram_bytes=tier.total_bytes,
        disk_store_bytes=total * row_stride(survey.layout),
        disk_reads_per_token=reads,
        disk_bytes_per_token=per_token,
        nvme_gbps_for_target=per_token * TARGET_TOK_S / 1e9,
    )


def stated_plan(path: Path) -> tuple[int, int] | None:
    """``(slots, experts)`` from the preset's ``# Plan: ... N of M expert slots`` comment."""
    found = PLAN_LINE.search(path.read_text())
    return (int(found.group(1)), int(found.group(2))) if found else None


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| preset | budget | context | prefill chunk | scope | policy | format | slots / experts | resident | KV "
        "| workspace | host store | host RAM |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        chunk = r["prefill_chunk"] or "whole prompt"
        lines.append(
            f"| `{r['preset']}` | {r['vram_budget']} | {r['max_context']} | {chunk} | {r['cache_scope']} | "
            f"{r['policy']} | "
            f"{r['expert_format']} | "
            f"{r['slots']} / {r['total_experts']} ({r['slot_fraction']:.0%}) | {r['resident_bytes'] / 1e9:.1f} GB | "
            f"{r['kv_cache_bytes'] / 1e9:.2f} GB | {r['workspace_bytes'] / 1e9:.2f} GB | "
            f"{r['host_store_bytes'] / 1e9:.1f} GB | {r['host_ram_bytes'] / 1e9:.1f} GB |"
        )
    return "\n".join(lines)


def disk_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| preset | budget | RAM limit | format | slots / experts | host slots / experts | disk store | disk per token "
        "| NVMe for 5 tok/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['preset']}` | {r['vram_budget']} | {r['host_memory_limit']} | {r['expert_format']} | "
            f"{r['slots']} / {r['total_experts']} ({r['slot_fraction']:.0%}) | "
            f"{r['host_tier_slots']} / {r['total_experts']} ({r['host_tier_fraction']:.0%}) | "
            f"{r['disk_store_bytes'] / 1e9:.1f} GB | {r['disk_bytes_per_token'] / 1e9:.2f} GB | "
            f"{r['nvme_gbps_for_target']:.1f} GB/s |"
        )
    return "\n".join(lines)


def main() -> int:
    """Print the presets' tables (configs/README.md quotes them): the card presets, then the disk presets."""
    print(table([plan_preset(path) for path in presets() if not is_disk_preset(path)]))
    print()
    print(disk_table([plan_preset(path) for path in presets() if is_disk_preset(path)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
