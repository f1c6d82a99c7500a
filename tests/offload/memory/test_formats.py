"""Expert storage formats: quantize and read back within the format's error, exact where the weights are
representable, nibble packing, odd sizes, and the compressed layout's bytes."""

from __future__ import annotations

import pytest
import torch

from offload.memory import formats
from offload.memory.host_store import HostExpertStore
from offload.memory.layout import ExpertLayout


def weights(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cols", [64, 100, 130])  # a multiple of the group, and two that are not
@pytest.mark.parametrize("group", [64, 128])
def test_int4_round_to_nearest_error_is_half_a_step(cols: int, group: int) -> None:
    w = weights(24, cols)
    fields = formats.quantize(w, "m", "int4", group, torch.float32)
    assert fields["m"].shape == (24, formats.padded(cols, group) // 2) and fields["m"].dtype == torch.uint8
    back = formats.dequantize(fields, "m", "int4", cols, group, torch.float32)
    assert back.shape == (24, cols)
    step = fields["m_scale"].repeat_interleave(group, dim=-1)[:, :cols]
    assert bool(((back - w).abs() <= step / 2 + 1e-6).all())


def test_int8_round_to_nearest_error_is_half_a_step() -> None:
    w = weights(16, 96, seed=1)
    fields = formats.quantize(w, "m", "int8", 0, torch.bfloat16)
    assert fields["m"].dtype == torch.int8 and fields["m_scale"].dtype == torch.bfloat16
    back = formats.dequantize(fields, "m", "int8", 96, 0, torch.float32)
    scale = fields["m_scale"].float()[:, None]
    assert bool(((back - w).abs() <= scale / 2 + 1e-6).all())


def int4_representable(rows: int, cols: int, group: int, seed: int = 0) -> torch.Tensor:
    """Weights int4 stores exactly: per group, codes 0..15 all present-able, an integer zero point, a
    power-of-two scale."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (rows, cols // group, group), generator=g)
    codes[..., 0], codes[..., 1] = 0, 15  # the group's range is the full code range
    zero = torch.randint(1, 15, (rows, cols // group, 1), generator=g)
    scale = torch.exp2(torch.randint(-8, -4, (rows, cols // group, 1), generator=g).float())
    return ((codes - zero) * scale).view(rows, cols)


def test_representable_weights_round_trip_exactly() -> None:
    w = int4_representable(8, 128, 64)
    fields = formats.quantize(w, "m", "int4", 64, torch.bfloat16)
    assert torch.equal(formats.dequantize(fields, "m", "int4", 128, 64, torch.float32), w)


def test_nibbles_pack_low_first() -> None:
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    packed = formats.pack_nibbles(codes)
    assert packed.tolist() == [[0x21, 0x0F]]
    assert torch.equal(formats.unpack_nibbles(packed), codes)


def test_mxfp4_reads_as_transformers_reads_gpt_oss() -> None:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(3)
    blocks = torch.randint(0, 256, (2, 6, 4, 16), generator=g, dtype=torch.uint8)  # [E, R, C/32, 16]
    scales = torch.randint(120, 130, (2, 6, 4), generator=g).to(torch.uint8)
    fields = {"m": blocks.view(2, 6, 64), "m_scale": scales}
    mine = formats.dequantize(fields, "m", "mxfp4", 128, 32, torch.float32)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, C, R]: transposed
    assert torch.equal(mine, theirs.transpose(1, 2))


def test_fp8_block_scales() -> None:
    g = torch.Generator().manual_seed(4)
    q = torch.randn(5, 7, generator=g).to(torch.float8_e4m3fn)
    scale = torch.rand(3, 4, generator=g) + 0.5  # blocks of 2: ceil(5/2) x ceil(7/2)
    back = formats.dequantize({"m": q, "m_scale": scale}, "m", "fp8", 7, 2, torch.float32)
    expected = torch.stack(
        [torch.stack([q[r, c].float() * scale[r // 2, c // 2] for c in range(7)]) for r in range(5)]
    )
    assert torch.equal(back, expected)


def test_compressed_layout_bytes() -> None:
    """Qwen3-30B-A3B's expert: int4 with bf16 scales per 64 is about 0.28 of bf16 (4.5 of 16 bits)."""
    bf16 = ExpertLayout(2048, 768, True, False, torch.bfloat16)
    int4 = ExpertLayout(2048, 768, True, False, torch.bfloat16, format="int4", group_size=64)
    int8 = ExpertLayout(2048, 768, True, False, torch.bfloat16, format="int8")
    assert int4.nbytes / bf16.nbytes == pytest.approx(4.5 / 16, rel=0.01)
    assert int8.nbytes / bf16.nbytes == pytest.approx(0.5, rel=0.01)
    assert all(f.offset % 256 == 0 for f in int4.fields) and int4.nbytes % 256 == 0
    assert (int4.format_name, int8.format_name, bf16.format_name) == ("int4", "int8", "bf16")
    with pytest.raises(ValueError, match="unknown expert format"):
        ExpertLayout(8, 8, True, False, torch.float32, format="int3")


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_store_quantizes_layer_by_layer_and_reads_back(fmt: str) -> None:
    layout = ExpertLayout(
        96, 40, True, True, torch.float32, format=fmt, group_size=64 if fmt == "int4" else 0
    )
    store = HostExpertStore(layout, num_layers=1, num_experts=3, pin=False)
    g = torch.Generator().manual_seed(5)
    hf = {
        "gate_up_proj": torch.randn(3, 80, 96, generator=g),
        "down_proj": torch.randn(3, 96, 40, generator=g),
        "gate_up_proj_bias": torch.randn(3, 80, generator=g),
        "down_proj_bias": torch.randn(3, 96, generator=g),
    }
    store.fill_layer(0, hf)
    for e in range(3):
        views = store.views(0, e)
        for name, source in (("gate_up", hf["gate_up_proj"][e]), ("down", hf["down_proj"][e])):
            back = layout.weight(views, name)
            expected = formats.dequantize(
                formats.quantize(source, name, fmt, layout.group_size, torch.float32), name, fmt,
                source.shape[1], layout.group_size, torch.float32,
            )  # fmt: skip
            assert torch.equal(back, expected)
        assert torch.equal(views["down_bias"], hf["down_proj_bias"][e])  # biases stay in the compute dtype
