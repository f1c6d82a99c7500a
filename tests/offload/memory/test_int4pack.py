"""The int4 and MXFP4 experts' copy for torch's int4pack CPU kernel: which layouts it takes, what it holds, what it costs
in host RAM, and that a run computing its host experts through it stays within tolerance of the device's."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import offload
from offload.hf.install import runtime_of
from offload.hf.skeleton import survey_checkpoint
from offload.kernels.host_experts import host_kernel_candidates
from offload.memory import int4pack
from offload.memory.int4pack import (
    Int4PackCopy,
    convert_expert,
    int4pack_expert_bytes,
    int4pack_unsupported,
    to_int4pack_layout,
)
from offload.memory.layout import ExpertLayout
from offload.runtime import host_rates
from offload.runtime.host_plan import check_host_memory, int4pack_copy_bytes, int4pack_copy_fits
from offload.torch_threads import use_torch_threads
from tests.helpers import assert_layers_agree, force_int4pack_on_cpu, load, prompt, slot_counts

BF16_INT4 = ExpertLayout(64, 96, True, True, torch.bfloat16, format="int4", group_size=64)


def test_which_layouts_the_kernel_takes() -> None:
    assert int4pack_unsupported(BF16_INT4) is None
    cases = {
        "not int4": ExpertLayout(64, 96, True, False, torch.bfloat16, format="int8"),
        "bf16 only": ExpertLayout(64, 96, True, False, torch.float32, format="int4", group_size=64),
        "group size 16": ExpertLayout(64, 96, True, False, torch.bfloat16, format="int4", group_size=16),
        "not a multiple of 16": ExpertLayout(
            40, 96, True, False, torch.bfloat16, format="int4", group_size=32
        ),
    }
    for reason, layout in cases.items():
        assert reason in (int4pack_unsupported(layout) or ""), reason
        with pytest.raises(ValueError, match="no int4pack copy"):
            Int4PackCopy(layout, 1, 2)


@pytest.fixture
def two_torch_threads() -> Iterator[None]:
    """Experts convert side by side, one per torch thread: two, whatever the process runs with."""
    before = torch.get_num_threads()
    use_torch_threads(2)
    yield
    use_torch_threads(before)


def test_the_copy_holds_every_expert_converted(two_torch_threads: None) -> None:
    experts = host_rates.synthetic_experts(BF16_INT4, 3, seed=1)
    copy = Int4PackCopy(BF16_INT4, num_layers=2, num_experts=3)
    copy.fill_layer(1, experts)
    assert copy.nbytes == 3 * int4pack_expert_bytes(BF16_INT4)
    for e, fields in enumerate(experts):
        want = convert_expert(fields, BF16_INT4)
        got = copy.views(1, e)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[name], want[name]) for name in want)
    # the zero point rides in torch's offset term: (q - 8) * s + (8 - z) * s == (q - z) * s
    pairs = got["down_scale_zeros"].float()  # [Cp/g, R, 2]
    scale, zero = fields["down_scale"].float().T, fields["down_zero"].float().T
    torch.testing.assert_close(pairs[..., 0], scale)
    torch.testing.assert_close(pairs[..., 1], (8 - zero) * scale, rtol=2**-8, atol=0)
    with pytest.raises(RuntimeError, match="layer 0 has no int4pack copy"):
        copy.views(0, 0)
    with pytest.raises(ValueError, match="2 experts, the store has 3"):
        copy.fill_layer(0, experts[:2])
    # experts convert on worker threads: a failure still surfaces
    broken = [dict(fields) for fields in experts]
    del broken[1]["down_scale"]
    with pytest.raises(KeyError, match="down_scale"):
        copy.fill_layer(0, broken)
    with pytest.raises(RuntimeError, match="layer 0 has no int4pack copy"):
        copy.views(0, 0)
    copy.release()
    assert copy.nbytes == 0


def test_mxfp4_weights_through_the_copy_are_exact() -> None:
    """Each e2m1 value split into two int4 halves: multiplying the identity reads every weight back, bitwise
    the dequantize oracle's (int4 is not bitwise: its zero point rides in a rounded bf16 offset)."""
    layout = ExpertLayout(64, 96, True, False, torch.bfloat16, format="mxfp4", group_size=32)
    assert int4pack_unsupported(layout) is None
    fields = host_rates.synthetic_experts(layout, 1, seed=2)[0]
    fields["gate_up_scale"].copy_(torch.randint(110, 135, fields["gate_up_scale"].shape))  # mixed exponents
    copy = convert_expert(fields, layout)
    for name, _, cols in layout.matrices:
        eye = torch.eye(cols, dtype=torch.bfloat16)
        read = torch._weight_int4pack_mm_for_cpu(
            torch.cat((eye, eye), dim=1), copy[f"{name}_int4pack"], 32, copy[f"{name}_scale_zeros"]
        )  # [C, R]: row c is column c of W
        assert torch.equal(read.T, layout.weight(fields, name)), name


FAST_LAYOUTS = {
    "AVX2": 1,
    "AVX512": 2,
}  # torch's CPU capabilities whose int4pack layout is laid out by uint8 ops


@pytest.fixture
def fresh_layout_check() -> Iterator[None]:
    """The once-per-process layout check run again, and forgotten after (it may see a patched capability)."""
    int4pack.fast_layout_pairs.cache_clear()
    yield
    int4pack.fast_layout_pairs.cache_clear()


def test_the_fast_layout_is_torchs(fresh_layout_check: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every row count (whole blocks of 32 or 64 rows, and a partial last one) and every code: the uint8 ops
    lay the codes out byte for byte as torch's converter does, and so does the whole expert's conversion, in
    row chunks."""
    capability = torch.backends.cpu.get_cpu_capability()
    assert int4pack.fast_layout_pairs() == FAST_LAYOUTS.get(capability, 0), capability
    generator = torch.Generator().manual_seed(3)
    for rows in (16, 32, 48, 64, 80, 96, 128, 144, 160):
        nibbles = torch.randint(0, 256, (rows, 48), dtype=torch.uint8, generator=generator)
        fast, slow = torch.empty_like(nibbles), torch.empty_like(nibbles)
        to_int4pack_layout(nibbles, fast)
        to_int4pack_layout(nibbles, slow, torch_converter=True)
        assert torch.equal(fast, slow), rows
    mxfp4 = ExpertLayout(64, 96, True, True, torch.bfloat16, format="mxfp4", group_size=32)
    for layout in (BF16_INT4, mxfp4):
        fields = host_rates.synthetic_experts(layout, 1, seed=4)[0]
        whole = convert_expert(fields, layout, torch_converter=True)  # one chunk, torch's converter
        with monkeypatch.context() as patch:
            patch.setattr(int4pack, "_CHUNK_BYTES", 2048)  # chunks of 64 rows, as large experts are converted
            chunked = convert_expert(fields, layout)
        assert all(torch.equal(chunked[k], whole[k]) for k in whole), layout.format


def test_a_layout_that_is_not_the_documented_one_is_left_to_torch(
    fresh_layout_check: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The check guards the fast path: told the other capability's layout, it finds the bytes differ, warns
    once, and every conversion goes through torch's converter (still torch's bytes)."""
    real = torch.backends.cpu.get_cpu_capability()
    if real not in FAST_LAYOUTS:
        pytest.skip(f"no fast int4pack layout on {real}: torch's converter is the only path here")
    other = "AVX512" if real == "AVX2" else "AVX2"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: other)
    assert int4pack.fast_layout_pairs() == 0
    assert "not the documented one" in caplog.text
    nibbles = torch.randint(0, 256, (160, 48), dtype=torch.uint8)
    got = torch.empty_like(nibbles)
    to_int4pack_layout(nibbles, got)
    assert torch.equal(got, int4pack._torch_layout(nibbles))


def _cuda_config(**options: object) -> SimpleNamespace:
    """What the host plan reads of an OffloadConfig on a CUDA device (none here to build one for)."""
    values = {"device": torch.device("cuda"), "host_compute": "auto", "host_memory_limit": None}
    values.update(dequantize=False, quantize_group=64, disk_tier="auto", cache_scope="global")
    values.update(options)
    return SimpleNamespace(**values)


def test_the_copy_is_planned_only_where_it_is_used(mixtral_checkpoint: Path) -> None:
    survey = survey_checkpoint(str(mixtral_checkpoint))
    int4 = replace(survey, layout=replace(survey.layout, format="int4", group_size=64, dtype=torch.bfloat16))
    copy = survey.total_experts * int4pack_expert_bytes(int4.layout)
    assert int4pack_copy_bytes(int4, _cuda_config()) == copy
    assert int4pack_copy_bytes(int4, _cuda_config(host_compute="off")) == 0
    assert int4pack_copy_bytes(int4, _cuda_config(device=torch.device("cpu"))) == 0
    assert int4pack_copy_bytes(survey, _cuda_config()) == 0  # not int4
    assert int4pack_copy_bytes(int4, _cuda_config(), slots=survey.total_experts) == 0  # nothing misses
    assert int4pack_copy_bytes(int4, _cuda_config(), slots=survey.total_experts - 1) == copy
    plan = check_host_memory(int4, _cuda_config(), 0, available=10**12)
    assert plan.int4pack_bytes == copy and "int4pack host kernel" in plan.describe()
    # no room for the copy: the load goes on without it
    tight = plan.total_bytes - copy // 2
    assert check_host_memory(int4, _cuda_config(), 0, available=tight).int4pack_bytes == 0
    assert int4pack_copy_fits(copy, _cuda_config(), available=copy)
    assert not int4pack_copy_fits(copy, _cuda_config(host_memory_limit=copy - 1), available=copy)


def test_host_experts_through_the_copy_match_the_device(
    tiny_checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CPU device is made to build the copy and pick the kernel (on CUDA the probe picks it): every MoE
    layer's output with every expert computed on the host through int4pack, against the same int4 model with
    every expert on the device, layer by layer."""
    path = tiny_checkpoints["mixtral"]
    force_int4pack_on_cpu(monkeypatch)
    options = dict(dtype="bf16", quantize="int4", kernel="torch")
    device = load(path, slot_counts(path)["all"], "cpu", host_compute="off", **options)
    host = load(path, slot_counts(path)["top_k"], "cpu", host_compute="always", **options)
    assert runtime_of(device).int4pack is None  # host compute off: no copy
    survey = runtime_of(host).survey
    assert_layers_agree(device, host)
    with torch.no_grad():
        host(prompt("cpu"))  # and the whole model runs through it
    stats = offload.stats(host)
    assert stats.host_kernel == "int4pack" and stats.host_expert_calls == stats.expert_uses > 0
    assert stats.host_kernel_copy_bytes == survey.total_experts * int4pack_expert_bytes(survey.layout)
    assert offload.stats(device).host_kernel_copy_bytes == 0
    offload.close(device)
    offload.close(host)


@pytest.mark.gpu
def test_int4pack_on_cuda(tiny_checkpoints: dict[str, Path]) -> None:
    """On a CUDA device the copy is made for real and the probe measures int4pack against the other kernels;
    host experts stay within tolerance of the device's, layer by layer, and the whole model runs."""
    path = tiny_checkpoints["mixtral"]
    device = load(path, slot_counts(path)["all"], "cuda", dtype="bf16", quantize="int4", host_compute="off")
    host = load(
        path, slot_counts(path)["top_k"], "cuda", dtype="bf16", quantize="int4", host_compute="always"
    )
    assert runtime_of(host).int4pack is not None and runtime_of(device).int4pack is None
    assert_layers_agree(device, host)
    with torch.no_grad():
        host(prompt("cuda"))
    stats = offload.stats(host)
    # The kernel is the probe's pick, which timing decides: exactly the one the probe stored in the rates cache
    # for this machine, layout and candidates (read back without probing again), int4pack among those weighed.
    runtime = runtime_of(host)
    workers = runtime.step.host
    assert workers is not None
    layout = runtime.survey.layout
    assert host_kernel_candidates(layout, int4pack=True) == ("reference", "dequant", "int4pack")
    activation = runtime.activations[0]
    assert activation is not None
    table, _ = host_rates.resolve(
        layout,
        runtime.config.device,
        workers.threads,
        workers.torch_threads,
        activation,
        False,
        int4pack=True,
    )
    assert workers.table == table and stats.host_kernel == table.describe() and stats.host_expert_calls > 0
    assert stats.host_kernel_copy_bytes > 0
    offload.close(device)
    offload.close(host)
