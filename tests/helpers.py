"""Helpers the tests share: repository paths, and loading a tiny checkpoint offloaded at a given slot count."""

from __future__ import annotations

from pathlib import Path

import torch

import offload
from offload.config import OffloadConfig
from offload.hf.experts import OffloadedExperts
from offload.hf.install import runtime_of
from offload.hf.skeleton import survey_checkpoint
from offload.runtime.budget import budget_for_slots

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT / "data" / "traces"

PROMPT_TOKENS = 12
NEW_TOKENS = 8
# fp32 on CPU: the per-expert torch path and transformers' grouped_mm differ only by summation order.
ATOL = RTOL = 1e-5


def slot_counts(path: Path) -> dict[str, int]:
    s = survey_checkpoint(str(path), torch.float32)
    return {
        "top_k": s.top_k,
        "quarter": max(s.top_k, round(0.25 * s.total_experts)),
        "half": round(0.5 * s.total_experts),
        "all": s.total_experts,
    }


def load(path: Path, slots: int, device: str, dtype: str = "fp32", **options) -> torch.nn.Module:
    config = OffloadConfig.create(1, device=device, dtype=dtype, max_context=64, **options)
    budget = budget_for_slots(survey_checkpoint(str(path), config.dtype, config), config, slots)
    return offload.from_pretrained(
        path, vram_budget=budget, device=device, dtype=dtype, max_context=64, progress=False, **options
    )


def prompt(device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(0, 128, (1, PROMPT_TOKENS), generator=generator).to(device)


def count_uses(model: torch.nn.Module) -> list[int]:
    """Independent count of expert uses: unique experts per layer call, seen from the module's inputs."""
    uses: list[int] = []

    def hook(module, args):
        uses.append(int(torch.unique(args[1]).numel()))

    for m in model.modules():
        if isinstance(m, OffloadedExperts):
            m.register_forward_pre_hook(hook)
    return uses


def force_int4pack_on_cpu(monkeypatch) -> None:
    """Make a CPU-device load build the int4pack copy and run host experts through it, as a CUDA one does where
    the probe finds that kernel fastest (offload.memory.int4pack); the probe still runs. Load with
    ``kernel="torch"``: the slots then hold the canonical layout, as a GPU's do (with ``auto`` a CPU device
    keeps its experts in the int4pack packing itself and needs no copy)."""
    from offload.kernels.kernel_table import KernelTable
    from offload.memory.int4pack import int4pack_expert_bytes
    from offload.runtime import host_plan, host_rates
    from offload.runtime.runtime import OffloadRuntime

    monkeypatch.setattr(
        host_plan,
        "int4pack_copy_bytes",
        lambda survey, config, slots=None: survey.total_experts * int4pack_expert_bytes(survey.layout),
    )
    monkeypatch.setattr(OffloadRuntime, "_fixed_table", lambda self: None)  # host experts: the probe's pick
    resolve = host_rates.resolve

    def pick_int4pack(*args, int4pack: bool = False, **kwargs):
        assert int4pack, "the runtime did not build the copy"
        resolve(*args, **kwargs)
        return KernelTable.single("int4pack"), None

    monkeypatch.setattr(host_rates, "resolve", pick_int4pack)


def assert_layers_agree(
    device: torch.nn.Module, host: torch.nn.Module, tolerance: float = 2e-2, tokens: int = 5
) -> None:
    """Every MoE layer's output of ``host`` within bf16 tolerance of ``device``'s on the same ``tokens`` random
    tokens and routing: in bf16 a tiny random model's routing flips on any rounding difference, so whole-model
    logits would compare different experts."""
    survey = runtime_of(host).survey
    on = runtime_of(device).config.device
    generator = torch.Generator().manual_seed(7)
    for layer in range(survey.num_layers):
        x = torch.randn(tokens, survey.layout.hidden_size, generator=generator).to(torch.bfloat16)
        ids = torch.stack(
            [torch.randperm(survey.num_experts, generator=generator)[: survey.top_k] for _ in x]
        )
        weights = torch.rand(ids.shape, generator=generator).softmax(-1).to(torch.bfloat16)
        x, ids, weights = x.to(on), ids.to(on), weights.to(on)
        with torch.no_grad():
            want = runtime_of(device).forward_layer(layer, x, ids, weights).float()
            got = runtime_of(host).forward_layer(layer, x, ids, weights).float()
        scale = want.abs().max().item()
        err = (got - want).abs().max().item()
        assert err <= tolerance * scale, f"layer {layer}: error {err:.3g} of {scale:.3g}"
