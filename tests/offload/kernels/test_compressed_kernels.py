"""Triton kernels reading compressed experts (int8, int4, mxfp4, fp8) straight from the slot pool, against
the dequantize-then-matmul oracle: every expert read back with ``formats.dequantize`` into a float layout,
then the torch reference (``F.linear``) over it.

The kernels dequantize each weight in fp32 exactly as ``formats.dequantize`` does and round it once to the
compute dtype, so they multiply the oracle's very weights: the tolerances are the float kernels' own
(``TOL`` in ``test_kernels.py``: fp32 1e-5, fp16 2e-3, bf16 1.6e-2, atol = rtol, outputs of order 1), the
difference being summation order and the oracle's rounding of gate/up to 16 bits. Quantization error itself
is far above these tolerances (checked), so a kernel that misread a scale, a zero point, a nibble or a
group would fail.
"""

from __future__ import annotations

import pytest
import torch

from offload.kernels import expert_pairs_torch, select_kernel
from offload.memory import formats
from offload.memory.layout import ExpertLayout
from offload.memory.slot_pool import SlotPool
from tests.offload.kernels.test_kernels import (
    DEVICE,
    PATHS,
    TOL,
    Case,
    routed_case,
    triton_kernel,
    waves_of,
)

# format -> group sizes to test: int4 groups that divide neither 40 nor 24 (padded last group) and one
# larger than a row; fp8 blocks that leave partial blocks on both axes, one of them not a power of two
# (groups straddle K tiles: the kernels' per-column path); mxfp4's fixed blocks of 32.
GROUPS = {"int8": [0], "int4": [16, 64], "mxfp4": [32], "fp8": [16, 24]}
FORMAT_CASES = [(fmt, g) for fmt, groups in GROUPS.items() for g in groups]


def _fields(
    fmt: str, name: str, rows: int, cols: int, group: int, dtype: torch.dtype, g: torch.Generator
) -> dict[str, torch.Tensor]:
    """One expert's matrix in ``fmt``, with weights of order ``1/sqrt(cols)`` (outputs of order 1)."""
    if fmt in formats.QUANTIZE_FORMATS:
        return formats.quantize(torch.randn(rows, cols, generator=g) / cols**0.5, name, fmt, group, dtype)
    if fmt == "mxfp4":  # every FP4 code; scales 2^-6..2^-4 (FP4 values reach 6)
        codes = torch.randint(0, 256, (rows, cols // 2), generator=g, dtype=torch.uint8)
        scales = torch.randint(121, 124, (rows, cols // 32), generator=g).to(torch.uint8)
        return {name: codes, f"{name}_scale": scales}
    q = (torch.randn(rows, cols, generator=g) * 4).to(torch.float8_e4m3fn)
    # subnormals, -0, 0 and +-448 (the largest finite code) on the first row
    q.view(torch.uint8)[0, :8] = torch.tensor([0x01, 0x07, 0x81, 0x86, 0x80, 0x00, 0x7E, 0xFE])
    blocks = (-(-rows // group), -(-cols // group))
    scale = (torch.rand(blocks, generator=g) + 0.5) / (4 * cols**0.5)
    scale[0, 0] /= 64  # keeps the block holding +-448 at the others' magnitude: outputs of order 1
    return {name: q, f"{name}_scale": scale}


def make_compressed_case(
    fmt: str,
    group: int,
    tokens: int = 7,
    hidden: int = 40,
    inter: int = 24,
    num_experts: int = 6,
    top_k: int = 2,
    slots: int | None = None,
    has_gate: bool = True,
    has_bias: bool = False,
    kind: str = "silu",
    dtype: torch.dtype = torch.float32,
    only_experts: list[int] | None = None,
    seed: int = 0,
) -> Case:
    if fmt == "mxfp4":  # the format needs both input dimensions in blocks of 32
        hidden, inter = max(32, hidden // 32 * 32), max(32, inter // 32 * 32)
    g = torch.Generator().manual_seed(seed)
    layout = ExpertLayout(hidden, inter, has_gate, has_bias, dtype, format=fmt, group_size=group)
    store = torch.zeros((num_experts, layout.nbytes), dtype=torch.uint8)
    views = layout.views(store)
    for e in range(num_experts):
        for name, rows, cols in layout.matrices:
            for field, value in _fields(fmt, name, rows, cols, group, dtype, g).items():
                views[field][e].copy_(value)
        for name in ("gate_up_bias", "down_bias"):
            if has_bias:
                views[name][e].copy_((torch.randn(views[name].shape[1:], generator=g) / 2).to(dtype))
    return routed_case(layout, store, g, tokens, top_k, slots, kind, only_experts)  # garbage: NaN scales


def dequantized(case: Case) -> Case:
    """The oracle's experts: the same layer call over a float layout holding ``formats.dequantize``'s
    weights (in the compute dtype) and the same biases."""
    src = case.layout
    layout = ExpertLayout(src.hidden_size, src.intermediate_size, src.has_gate, src.has_bias, src.dtype)
    store = torch.zeros((case.store.shape[0], layout.nbytes), dtype=torch.uint8, device=DEVICE)
    ours, theirs = layout.views(store), src.views(case.store)
    for name, _, cols in src.matrices:
        ours[name].copy_(formats.dequantize(theirs, name, src.format, cols, src.group_size, src.dtype))
    for name in ("gate_up_bias", "down_bias"):
        if name in theirs:
            ours[name].copy_(theirs[name])
    pool = SlotPool(layout, case.pool.num_slots, DEVICE)
    return Case(layout, store, pool, case.routed, case.activation)


def check(case: Case, kernel, waves=None) -> torch.Tensor:
    waves = waves if waves is not None else case.one_wave()
    oracle = dequantized(case).run(expert_pairs_torch, waves)
    out = case.run(kernel, waves)
    torch.testing.assert_close(out, oracle, **TOL[case.layout.dtype])
    assert kernel.calls.get("torch", 0) == 0  # read in the kernel, not by the torch fallback
    return out


# every format case in fp32; the 16-bit compute dtypes once per format (the dtype changes only the final
# rounding of a dequantized weight, not how its code, scale and zero are read)
DTYPE_CASES = [(fmt, g, torch.float32) for fmt, g in FORMAT_CASES] + [
    (fmt, GROUPS[fmt][-1], dtype) for fmt in GROUPS for dtype in (torch.float16, torch.bfloat16)
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("fmt", "group", "dtype"), DTYPE_CASES)
def test_every_format_and_compute_dtype(fmt: str, group: int, dtype: torch.dtype, path: str) -> None:
    """Both paths; int4 and fp8 rows of 40 and 24 columns end in a partial group or block, and tiles end
    in masked tails; biases on, gated activation (gpt-oss's, as its MXFP4 experts use)."""
    kind = "gpt_oss" if fmt == "mxfp4" else "silu"
    case = make_compressed_case(fmt, group, dtype=dtype, has_bias=True, kind=kind)
    check(case, triton_kernel(path=path, block_m=16))


SHAPES: dict[str, dict] = {
    "single_token": dict(tokens=1),
    "top1_no_gate": dict(tokens=9, top_k=1, has_gate=False, kind="relu"),
    "empty_experts": dict(tokens=6, num_experts=10, only_experts=[1, 4, 5, 8]),
    "more_experts_than_slots": dict(tokens=8, num_experts=12, top_k=3, slots=4),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize(("fmt", "group"), [("int8", 0), ("int4", 16), ("mxfp4", 32), ("fp8", 16)])
def test_shapes(fmt: str, group: int, shape: str, path: str) -> None:
    """One token, top-1 without a gate, experts with no pairs named in the wave, several waves in shuffled
    slots (garbage in the others). Several tokens per expert in every case but the first."""
    case = make_compressed_case(fmt, group, **SHAPES[shape])
    if shape == "empty_experts":
        waves = case.one_wave(list(range(10)))
    elif shape == "more_experts_than_slots":
        waves = waves_of(case, case.pool.num_slots, seed=1)
        assert len(waves) > 1
    else:
        waves = case.one_wave()
    check(case, triton_kernel(path=path, block_m=16), waves)


@pytest.mark.parametrize(("fmt", "group", "split"), [("int4", 16, 3), ("fp8", 16, 2), ("int8", 0, 3)])
def test_decode_split_k_across_groups(fmt: str, group: int, split: int) -> None:
    """K tiles of 8 columns: a group spans two tiles, splits end mid-group, K = 40 (5 tiles) splits
    unevenly in 2 and in 3."""
    case = make_compressed_case(fmt, group, tokens=4, hidden=40, inter=40, has_bias=True)
    kernel = triton_kernel(path="decode", split_k=split, decode_block_k=8)
    check(case, kernel)
    assert kernel.last_plan.gate_up.split == split


@pytest.mark.parametrize("path", PATHS)
def test_int4_tiles_narrower_and_wider_than_a_group(path: str) -> None:
    """Group 16 read through 8-wide and 32-wide K tiles: scales looked up per column, not per tile."""
    case = make_compressed_case("int4", 16, tokens=3, hidden=72, inter=40)
    for block_k in (8, 32):
        options = dict(decode_block_k=block_k) if path == "decode" else dict(block_k=max(16, block_k))
        check(case, triton_kernel(path=path, block_m=16, **options))


@pytest.mark.parametrize(("fmt", "group"), [("int4", 16), ("mxfp4", 32)])
def test_quantization_error_is_above_the_tolerance(fmt: str, group: int) -> None:
    """The check is sharp: weights off by a sixteenth, less than one int4 step for most of them, already
    fail it at the fp32 tolerance, so a misread scale, zero point, nibble or group cannot pass."""
    case = make_compressed_case(fmt, group, tokens=4)
    oracle = dequantized(case).run(expert_pairs_torch, case.one_wave())
    garbled = dequantized(case)
    for name, _, _ in case.layout.matrices:  # every weight off by one quantization step or so
        view = garbled.layout.views(garbled.store)[name]
        view.mul_(1.0 + 1.0 / 16)
    off = garbled.run(expert_pairs_torch, case.one_wave())
    assert not torch.allclose(off, oracle, **TOL[torch.float32])


@pytest.mark.parametrize(("path", "split"), [("decode", None), ("decode", 2), ("prefill", None)])
def test_bitwise_independent_of_waves_and_slots(path: str, split: int | None) -> None:
    """Invariant *wave-independence* holds for compressed experts too."""
    case = make_compressed_case("int4", 16, tokens=5, num_experts=9, top_k=3, slots=12, has_bias=True, seed=3)
    kernel = triton_kernel(path=path, block_m=16, split_k=split, decode_block_k=16 if split else None)
    whole = check(case, kernel)
    for size, seed in [(1, 0), (4, 1)]:
        assert torch.equal(case.run(kernel, waves_of(case, size, seed)), whole), f"waves of {size}"


@pytest.mark.parametrize("path", PATHS)
def test_prepared_launches_and_slot_table_row(path: str) -> None:
    """prepare() launches the compressed kernels (no torch fallback) and gives the same bits as a call,
    also when the slots come from the pool's device slot table row."""
    case = make_compressed_case("fp8", 16, tokens=5, dtype=torch.bfloat16)
    kernel = triton_kernel(path=path, block_m=16)
    wave = case.one_wave()[0]
    expected = check(case, kernel, [wave])
    experts, slots = (list(t) for t in zip(*wave, strict=True))
    row = torch.full((case.routed.num_experts,), -1, dtype=torch.int32, device=DEVICE)
    row[experts] = torch.tensor(slots, dtype=torch.int32, device=DEVICE)
    out = torch.full_like(expected, float("nan"))
    kernel.prepare(case.routed, experts, slots, case.pool, case.activation, out, slot_row=row)()
    assert torch.equal(out, expected)
    assert kernel.calls.get("torch", 0) == 0


def test_generate_int4_triton_equals_torch(tiny_checkpoints: dict) -> None:
    """End to end through the runtime: a tiny Mixtral quantized to int4 while loading generates the same
    greedy tokens with kernel="triton" as with "torch", logits within the fp32 tolerance; and with triton,
    bitwise the same logits whether every expert is resident or only top-k slots exist (several waves)."""
    import offload
    from tests.helpers import load, prompt, slot_counts

    path = tiny_checkpoints["mixtral"]
    ids = prompt(str(DEVICE))
    shared = select_kernel("triton", DEVICE)  # the instance the runtime calls
    before = dict(shared.calls)
    runs = {}
    for kernel, budget in [("torch", "all"), ("triton", "all"), ("triton", "top_k")]:
        model = load(path, slot_counts(path)[budget], str(DEVICE), quantize="int4", kernel=kernel)
        with torch.no_grad():
            logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=2, do_sample=False)
        runs[kernel, budget] = (logits, tokens, offload.stats(model))
    (ref_logits, ref_tokens, _), (logits, tokens, stats), (tight_logits, tight_tokens, tight) = runs.values()
    assert stats.expert_format == "int4" and tight.waves > tight.layer_calls
    torch.testing.assert_close(logits, ref_logits, **TOL[torch.float32])
    assert torch.equal(tokens, ref_tokens) and torch.equal(tight_tokens, tokens)
    assert torch.equal(tight_logits, logits)
    grew = {path: shared.calls[path] - before.get(path, 0) for path in ("decode", "prefill", "torch")}
    assert grew["decode"] > 0 and grew["prefill"] > 0 and grew["torch"] == 0  # the fused kernels ran
