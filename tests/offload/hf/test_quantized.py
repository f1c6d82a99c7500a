"""Quantized checkpoints: MXFP4 (gpt-oss) and fine-grained FP8 load dequantized; other methods are refused.

The checkpoints are written here, in the on-disk formats transformers reads, from models whose weights are
exactly representable in the format: dequantizing is then lossless, and the offloaded model is compared
with the original full-precision model itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

import offload
from offload.hf.install import runtime_of
from tests.helpers import assert_layers_agree, force_int4pack_on_cpu
from tests.tiny_models import tiny_config

FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def fp4_representable(
    shape: tuple[int, ...], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random FP4 codes [..., cols] and one power-of-two exponent per 32 columns, and their values."""
    codes = torch.randint(0, 16, shape, generator=generator, dtype=torch.uint8)
    exponents = torch.randint(-6, -3, (*shape[:-1], shape[-1] // 32), generator=generator)
    values = FP4[codes.long()] * torch.exp2(exponents.float()).repeat_interleave(32, dim=-1)
    return codes, exponents, values


def pack_mxfp4(codes: torch.Tensor, exponents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., rows, cols] codes -> blocks [..., rows, cols/32, 16] (two codes a byte, low nibble first) and
    scales [..., rows, cols/32] (exponent + 127), as in gpt-oss checkpoints."""
    pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 32, 16, 2)
    blocks = (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)
    return blocks, (exponents + 127).to(torch.uint8)


@pytest.fixture(scope="module")
def gpt_oss_mxfp4(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, transformers.PreTrainedModel]:
    config = tiny_config("gpt_oss")
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(config).to(torch.bfloat16).eval()
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                # Stored [E, in, out]; the checkpoint quantizes [E, out, in] rows along `in`.
                codes, exponents, values = fp4_representable(param.transpose(1, 2).shape, generator)
                param.copy_(values.transpose(1, 2))
                tensors[name + "_blocks"], tensors[name + "_scales"] = pack_mxfp4(codes, exponents)
            else:
                tensors[name] = param.detach().clone().contiguous()
    path = tmp_path_factory.mktemp("mxfp4")
    save_file(tensors, path / "model.safetensors")
    saved = config.to_dict()
    saved["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": None}
    saved["dtype"] = "bfloat16"
    (path / "config.json").write_text(json.dumps(saved))
    return path, model


def test_mxfp4_experts_load_dequantized(gpt_oss_mxfp4: tuple[Path, transformers.PreTrainedModel]) -> None:
    """dequantize=True: the experts are expanded to the compute dtype while loading."""
    path, original = gpt_oss_mxfp4
    default = offload.from_pretrained(
        path, vram_budget="1GB", device="cpu", max_context=64, dequantize=True, progress=False
    )
    assert runtime_of(default).survey.layout.dtype == torch.bfloat16  # the dtype gpt-oss was quantized from
    assert offload.stats(default).expert_format == "bf16"
    # Compared in fp32, where the dequantized bf16 values are exact, so only summation order differs.
    model = offload.from_pretrained(
        path, vram_budget="1GB", device="cpu", dtype="fp32", max_context=64, dequantize=True, progress=False
    )
    original = original.float()
    runtime = runtime_of(model)
    assert (
        getattr(model.config, "quantization_config", None) is None
    )  # dequantized: nothing quantized remains
    for layer, name in enumerate(runtime.survey.layer_names):
        experts = original.get_submodule(name)
        for e in range(experts.num_experts):
            views = runtime.store.views(layer, e)
            # canonical gate_up: [gate; up] de-interleaved from gpt-oss's alternating columns, [out, in]
            gate_up = experts.gate_up_proj[e].t()
            assert torch.equal(views["gate_up"], torch.cat((gate_up[0::2], gate_up[1::2])))
            assert torch.equal(views["down"], experts.down_proj[e].t())
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(
        model.generate(ids, max_new_tokens=5, do_sample=False),
        original.generate(ids, max_new_tokens=5, do_sample=False),
    )


def test_mxfp4_experts_stay_mxfp4(gpt_oss_mxfp4: tuple[Path, transformers.PreTrainedModel]) -> None:
    """By default the experts keep the checkpoint's bytes (about a quarter of bf16's), de-interleaved into the
    canonical order, and the model gives the original's outputs (its weights are exactly MXFP4), bitwise the
    same at a top-k budget and with every expert resident."""
    path, original = gpt_oss_mxfp4
    from safetensors import safe_open

    original = original.float()
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = original(ids).logits
    logits = []
    for budget in ("1GB", None):
        options = dict(device="cpu", dtype="fp32", max_context=64, progress=False)
        if budget is None:  # the smallest budget: one layer's top-k slots
            minimum = offload.from_pretrained(path, vram_budget="1GB", **options)
            runtime = runtime_of(minimum)
            budget = runtime.budget.fixed_bytes + runtime.survey.top_k * runtime.survey.layout.nbytes
        model = offload.from_pretrained(path, vram_budget=budget, **options)
        runtime = runtime_of(model)
        layout = runtime.survey.layout
        assert (layout.format, offload.stats(model).expert_format) == ("mxfp4", "mxfp4")
        with torch.no_grad():
            logits.append(model(ids).logits)
        torch.testing.assert_close(logits[-1], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(logits[0], logits[1])
    assert runtime.pool.num_slots == runtime.survey.top_k
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        name = runtime.survey.layer_names[0]
        blocks = f.get_tensor(f"{name}.gate_up_proj_blocks").flatten(
            2
        )  # [E, 2I, H/2], gate and up interleaved
    views = runtime.store.views(0, 1)
    assert torch.equal(views["gate_up"], torch.cat((blocks[1, 0::2], blocks[1, 1::2])))
    full = offload.from_pretrained(path, vram_budget="1GB", device="cpu", dequantize=True, progress=False)
    assert layout.nbytes < 0.35 * runtime_of(full).survey.layout.nbytes  # 4.25 of 16 bits, scales and padding


def test_mxfp4_host_experts_through_int4pack(
    gpt_oss_mxfp4: tuple[Path, transformers.PreTrainedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """gpt-oss's MXFP4 experts (biases, clamped activation) computed on the host through the int4pack copy,
    each e2m1 value split into two int4 halves: every MoE layer within bf16 rounding of the device's."""
    path, _ = gpt_oss_mxfp4
    force_int4pack_on_cpu(monkeypatch)
    options = dict(vram_budget="1GB", device="cpu", max_context=64, kernel="torch", progress=False)
    device = offload.from_pretrained(path, host_compute="off", **options)
    host = offload.from_pretrained(path, host_compute="always", **options)
    assert runtime_of(host).survey.layout.format == "mxfp4" and runtime_of(host).int4pack is not None
    assert_layers_agree(device, host)
    stats = offload.stats(host)
    assert stats.host_kernel == "int4pack" and stats.host_expert_calls > 0 and stats.expert_misses == 0
    offload.close(device)
    offload.close(host)


def test_quantize_needs_full_precision_experts(
    gpt_oss_mxfp4: tuple[Path, transformers.PreTrainedModel],
) -> None:
    path, _ = gpt_oss_mxfp4
    with pytest.raises(offload.OffloadError, match="stored in mxfp4 already"):
        offload.from_pretrained(path, vram_budget="1GB", device="cpu", quantize="int4", progress=False)
    model = offload.from_pretrained(
        path, vram_budget="1GB", device="cpu", quantize="int4", dequantize=True, progress=False
    )
    assert offload.stats(model).expert_format == "int4"


def fp8_representable(weight: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """e4m3 codes, per-block inverse scales, and the exact values they stand for (fine-grained FP8)."""
    out, inp = weight.shape
    rows, cols = -(-out // block), -(-inp // block)
    padded = torch.zeros(rows * block, cols * block)
    padded[:out, :inp] = weight.float()
    tiles = padded.view(rows, block, cols, block)
    scale_inv = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-8) / 448.0  # [rows, cols]
    codes = (tiles / scale_inv[:, None, :, None]).to(torch.float8_e4m3fn)
    values = (codes.float() * scale_inv[:, None, :, None]).view(rows * block, cols * block)[:out, :inp]
    return codes.view(rows * block, cols * block)[:out, :inp].contiguous(), scale_inv, values


def test_fine_grained_fp8_experts_stay_fp8(tmp_path: Path) -> None:
    block = 16
    config = tiny_config("qwen3_moe")
    torch.manual_seed(0)
    original = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    original.save_pretrained(tmp_path / "full")  # per-expert keys, as hub checkpoints store them
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "full" / "model.safetensors")
    quantized = {}
    for key, value in tensors.items():
        is_linear = (
            key.endswith(".weight") and value.dim() == 2 and ("experts." in key or "self_attn." in key)
        )
        if not is_linear or key.endswith("norm.weight"):
            quantized[key] = value
            continue
        codes, scale_inv, values = fp8_representable(value, block)
        quantized[key] = codes
        quantized[key.removesuffix("weight") + "weight_scale_inv"] = scale_inv
        tensors[key] = values  # the exactly representable weights the original model will use
    # The reference: the same model with the exactly representable weights, loaded as transformers does.
    save_file(tensors, tmp_path / "full" / "model.safetensors")
    original = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "full", dtype=torch.float32
    ).eval()
    path = tmp_path / "fp8"
    path.mkdir()
    save_file(quantized, path / "model.safetensors")
    saved = json.loads((tmp_path / "full" / "config.json").read_text())
    saved["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [block, block],
    }
    (path / "config.json").write_text(json.dumps(saved))

    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    for dequantize, fmt in ((False, "fp8"), (True, "fp32")):  # kept in e4m3 with block scales, or expanded
        model = offload.from_pretrained(
            path,
            vram_budget="1GB",
            device="cpu",
            dtype="fp32",
            max_context=64,
            dequantize=dequantize,
            progress=False,
        )
        assert offload.stats(model).expert_format == fmt
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, original(ids).logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(
            model.generate(ids, max_new_tokens=5, do_sample=False),
            original.generate(ids, max_new_tokens=5, do_sample=False),
        )
    # Blocks that do not divide the experts' sizes cannot stack gate and up scales: dequantized, with a warning.
    saved["quantization_config"]["weight_block_size"] = [24, 24]
    (path / "config.json").write_text(json.dumps(saved))
    model = offload.from_pretrained(
        path, vram_budget="1GB", device="cpu", dtype="fp32", max_context=64, progress=False
    )
    assert offload.stats(model).expert_format == "fp32"


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes", "compressed-tensors"])
def test_other_quantization_methods_are_refused(method: str, tmp_path: Path) -> None:
    config = tiny_config("mixtral")
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["quantization_config"] = {"quant_method": method, "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(offload.UnsupportedModelError, match=f"quantized with '{method}'"):
        offload.from_pretrained(tmp_path, vram_budget="1GB", device="cpu", progress=False)


def test_mxfp4_experts_on_a_cpu_device_run_int4pack(
    gpt_oss_mxfp4: tuple[Path, transformers.PreTrainedModel], tmp_path: Path
) -> None:
    """On a CPU device gpt-oss's MXFP4 experts are laid out for int4pack as they load (2.4 times their bytes
    per slot, planned in the budget) and computed by it: every MoE layer within bf16 rounding of the
    dequantize-then-compute oracle at decode and prefill sizes, the whole model bitwise the same at a top-k
    budget and with every expert resident, and the laid-out store kept on disk for the next load."""
    path, _ = gpt_oss_mxfp4
    options = dict(device="cpu", max_context=64, progress=False, store_dir=str(tmp_path))
    oracle = offload.from_pretrained(path, vram_budget="1GB", kernel="torch", **options)
    oracle_layout = runtime_of(oracle).survey.layout
    resident = offload.from_pretrained(path, vram_budget="1GB", **options)
    runtime = runtime_of(resident)
    layout = runtime.survey.layout
    assert (layout.format, layout.packing, layout.dtype) == ("mxfp4", "int4pack", torch.bfloat16)
    assert 2.0 * oracle_layout.nbytes < layout.nbytes < 2.6 * oracle_layout.nbytes
    assert runtime.pool.num_slots == runtime.survey.total_experts
    for tokens in (3, 200):
        assert_layers_agree(oracle, resident, tokens=tokens)
    budget = runtime.budget.fixed_bytes + runtime.survey.top_k * layout.nbytes  # one layer's top-k slots
    scarce = offload.from_pretrained(path, vram_budget=budget, **options)
    assert runtime_of(scarce).pool.num_slots == runtime.survey.top_k
    assert offload.stats(scarce).store_source.startswith("read from the compressed-store cache")
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(resident(ids).logits, scarce(ids).logits)
    assert offload.stats(scarce).kernels.endswith("on int4pack slots")
