"""Compressed experts on a CPU device run the fastest host kernels: int4 out of slots in the int4pack packing,
int8 through int8pack, each expert's kernel chosen by its token count from a measured table.

The oracle is the dequantize-then-compute reference (``kernel="torch"``, canonical slots), itself tied to the
unmodified transformers model in ``test_compressed_experts.py``. These models compute in bf16, where a tiny
random model's routing flips on any rounding difference, so kernels are compared layer by layer on the same
tokens and routing (``assert_layers_agree``), within 2% of the layer's largest output: int4pack folds the zero
point into a bf16 offset and accumulates in its own order (``docs/host-compute.md``). Across budgets a kernel
gives the same bits: the whole model's logits at top-k slots equal those with every expert resident.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import offload
from offload.config import OffloadConfig, check_kernel_choice
from offload.hf.install import runtime_of
from offload.hf.skeleton import survey_checkpoint
from offload.kernels.kernel_table import HostKernelPairs, KernelTable
from offload.kernels.selection import device_layout
from offload.memory.int4pack import dequantize_int4pack, packed_layout
from offload.memory.layout import ExpertLayout
from offload.runtime import host_rates
from offload.runtime.budget import budget_for_slots
from offload.runtime.host_rates import synthetic_experts
from tests.helpers import assert_layers_agree, prompt

ARCH = "mixtral"  # gate_up 96 rows (one whole block of torch's layout and a partial one), down 32


def load_bf16(path: Path, slots: str, **options: object) -> torch.nn.Module:
    """The checkpoint in bf16 on the CPU device at ``slots`` ("top_k" or "all") slots of its layout."""
    config = OffloadConfig.create(1, device="cpu", dtype="bf16", max_context=64, **options)
    survey = survey_checkpoint(str(path), config.dtype, config)
    count = survey.top_k if slots == "top_k" else survey.total_experts
    budget = budget_for_slots(survey, config, count)
    model = offload.from_pretrained(
        path, vram_budget=budget, device="cpu", dtype="bf16", max_context=64, progress=False, **options
    )
    assert runtime_of(model).budget.slots == count
    return model


CASES = [  # (quantize, group, kernel, the packing the slots hold)
    ("int4", 32, "auto", "int4pack"),
    ("int4", 64, "int4pack", "int4pack"),
    ("int4", 64, "dequant", ""),
    ("int8", 64, "auto", ""),
    ("int8", 64, "int8pack", ""),
]


@pytest.mark.parametrize(("fmt", "group", "kernel", "packing"), CASES)
def test_cpu_kernels_match_the_oracle_and_are_bitwise_across_budgets(
    fmt: str, group: int, kernel: str, packing: str, tiny_checkpoints: dict[str, Path]
) -> None:
    path = tiny_checkpoints[ARCH]
    options = dict(quantize=fmt, quantize_group=group)
    oracle = load_bf16(path, "all", kernel="torch", **options)
    ids = prompt("cpu")
    logits = {}
    for slots in ("top_k", "all"):
        model = load_bf16(path, slots, kernel=kernel, **options)
        runtime = runtime_of(model)
        assert runtime.survey.layout.packing == packing
        # slots are planned in the packing's bytes
        assert offload.stats(model).expert_bytes == runtime.survey.layout.nbytes == runtime.pool.layout.nbytes
        assert_layers_agree(oracle, model, tokens=5)  # decode-sized calls: one token or two per expert
        assert_layers_agree(oracle, model, tokens=300)  # prefill-sized: tens of tokens per expert
        with torch.no_grad():
            logits[slots] = model(ids).logits
        table = runtime.kernel_table
        assert isinstance(runtime.step.kernel, HostKernelPairs) and table is not None
        if kernel != "auto":
            assert table.names == (kernel,)
        stats = offload.stats(model)
        assert stats.kernels.startswith(table.describe()) and stats.host_expert_calls == 0
        if packing:
            assert stats.kernels.endswith("on int4pack slots")
        offload.close(model)
    assert torch.equal(logits["top_k"], logits["all"])


def test_a_kernel_table_serves_decode_and_prefill_with_different_kernels(
    tiny_checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A table whose kernel changes with the token count (as measured tables do, between decode and prefill):
    both kernels run in one forward, results stay within the oracle's tolerance and bitwise across budgets."""
    path = tiny_checkpoints[ARCH]
    table = KernelTable(((1, "int4pack"), (16, "reference")))
    assert [table.name_for(n) for n in (1, 3, 4, 100)] == ["int4pack", "int4pack", "reference", "reference"]
    monkeypatch.setattr(host_rates, "resolve", lambda *args, **kwargs: (table, None))
    used: list[str] = []
    original = KernelTable.kernel_for

    def recording(self: KernelTable, tokens: int) -> object:
        used.append(self.name_for(tokens))
        return original(self, tokens)

    monkeypatch.setattr(KernelTable, "kernel_for", recording)
    options = dict(quantize="int4", quantize_group=32)
    oracle = load_bf16(path, "all", kernel="torch", **options)
    ids = torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(3))  # ~12 tokens per expert
    logits = []
    for slots in ("top_k", "all"):
        model = load_bf16(path, slots, **options)
        assert runtime_of(model).kernel_table == table
        assert_layers_agree(oracle, model, tokens=40)
        used.clear()
        with torch.no_grad():
            logits.append(model(ids).logits)
        assert {"int4pack", "reference"} <= set(used)
        assert offload.stats(model).kernels == "int4pack up to 3 tokens, reference above on int4pack slots"
    assert torch.equal(logits[0], logits[1])


def test_the_measured_table_is_kept_per_machine_and_layout(tiny_checkpoints: dict[str, Path]) -> None:
    """kernel auto measures the table once per machine and layout (the rates cache) and every load after
    reads it back: the same kernels, hence the same bits."""
    path = tiny_checkpoints[ARCH]
    first = load_bf16(path, "top_k", quantize="int4", quantize_group=32)
    second = load_bf16(path, "top_k", quantize="int4", quantize_group=32)
    table = runtime_of(first).kernel_table
    assert table is not None and [n for n, _ in table.points] == list(host_rates.TABLE_TOKENS)
    assert set(table.names) <= {"reference", "int4pack"}
    assert runtime_of(second).kernel_table == table
    with torch.no_grad():
        assert torch.equal(first(prompt("cpu")).logits, second(prompt("cpu")).logits)


def test_the_packed_store_is_cached_on_disk(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """The compressed-store cache keeps the experts as laid out for int4pack (keyed by torch's CPU layout):
    the second load reads them instead of quantizing and converting again, and computes the same bits."""
    path = tiny_checkpoints[ARCH]
    options = dict(quantize="int4", quantize_group=32, store_dir=str(tmp_path))
    first = load_bf16(path, "top_k", **options)
    second = load_bf16(path, "top_k", **options)
    assert "quantized and laid out for int4pack while loading" in offload.stats(first).store_source
    assert offload.stats(second).store_source.startswith("read from the compressed-store cache")
    for layer in range(runtime_of(first).survey.num_layers):
        assert torch.equal(
            runtime_of(first).store.layer_bytes(layer), runtime_of(second).store.layer_bytes(layer)
        )
    with torch.no_grad():
        assert torch.equal(first(prompt("cpu")).logits, second(prompt("cpu")).logits)


@pytest.mark.parametrize(
    ("fmt", "group", "hidden", "inter"), [("int4", 64, 64, 48), ("int4", 32, 48, 104), ("mxfp4", 32, 96, 96)]
)
def test_the_packing_reads_back_the_oracles_weights(fmt: str, group: int, hidden: int, inter: int) -> None:
    """Read back from the int4pack packing (whole blocks of torch's layout by uint8 ops, a partial block through
    torch's kernel): MXFP4 exactly the oracle's weights, int4 within the bf16 rounding of the folded zero point."""
    layout = ExpertLayout(hidden, inter, True, False, torch.bfloat16, format=fmt, group_size=group)
    fields = synthetic_experts(layout, 1, seed=5, int4pack=True)[0]
    for name in ("gate_up", "down"):
        want = layout.weight(fields, name).float()
        got = dequantize_int4pack(fields, name, packed_layout(layout)).float()
        assert got.shape == want.shape
        if fmt == "mxfp4":
            assert torch.equal(got, want), name
        else:
            assert (got - want).abs().max().item() <= 2 * 2**-8 * want.abs().max().item(), name


def test_kernel_choices_that_cannot_run_are_refused() -> None:
    int4 = ExpertLayout(64, 96, True, False, torch.bfloat16, format="int4", group_size=64)
    cpu = torch.device("cpu")
    assert device_layout(int4, cpu, "auto").packing == "int4pack"
    assert device_layout(int4, cpu, "torch").packing == ""
    assert device_layout(int4, torch.device("cuda"), "auto").packing == ""  # a GPU's slots: Triton's layout
    fp32 = ExpertLayout(64, 96, True, False, torch.float32, format="int4", group_size=64)
    assert device_layout(fp32, cpu, "auto").packing == ""  # torch's kernel is vectorized for bf16 only
    with pytest.raises(offload.OffloadError, match=r"int4pack' cannot compute these experts: .*bf16 only"):
        device_layout(fp32, cpu, "int4pack")
    with pytest.raises(offload.OffloadError, match="int8pack' computes int8 experts, these are int4"):
        device_layout(int4, cpu, "int8pack")
    with pytest.raises(offload.OffloadError, match="is a CPU kernel"):
        check_kernel_choice("int4pack", torch.device("cuda"))
    with pytest.raises(offload.OffloadError, match="kernel must be one of"):
        check_kernel_choice("fast", cpu)


def test_the_disk_tier_keeps_the_packing(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """With the disk tier the int4pack packing goes to disk as it is and comes back into host slots: the same
    bits as every expert in RAM."""
    path = tiny_checkpoints[ARCH]
    options = dict(quantize="int4", quantize_group=32, store_dir=str(tmp_path))
    in_ram = load_bf16(path, "top_k", **options)
    on_disk = load_bf16(path, "top_k", disk_tier="always", **options)
    runtime = runtime_of(on_disk)
    assert runtime.tier is not None and runtime.survey.layout.packing == "int4pack"
    with torch.no_grad():
        assert torch.equal(in_ram(prompt("cpu")).logits, on_disk(prompt("cpu")).logits)
    assert offload.stats(on_disk).disk_reads > 0
