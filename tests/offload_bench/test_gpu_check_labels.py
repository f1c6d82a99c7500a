"""The GPU check's labels say what was measured: a host buffer whose registration failed is never timed as
"registered", the pinned bytes of a run are the host store's own, and the budget stage judges reserved
memory and takes the driver's figure as a peak sampled while the row runs (issue 24, item 4)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from offload.memory import host_memory
from offload.memory.host_store import HostExpertStore
from offload.memory.layout import ExpertLayout
from offload_bench.e2e_runs import host_memory_fields
from offload_bench.gpu_check import stage_budget, stage_machine
from offload_bench.gpu_check.part import Part

LAYOUT = ExpertLayout(16, 8, True, False, torch.float32)


@pytest.fixture
def registration_fails(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """cudaHostRegister failing as under a memlock limit: host_buffer hands back pageable memory and False."""
    asked: list[bool] = []

    def failing(nbytes: int, pin: bool) -> tuple[torch.Tensor, bool]:
        asked.append(pin)
        return torch.zeros(nbytes, dtype=torch.uint8), False

    monkeypatch.setattr(host_memory, "host_buffer", failing)
    return asked


def test_a_buffer_whose_registration_failed_is_labelled_pageable(registration_fails: list[bool]) -> None:
    _, label = stage_machine.host_source(4096, pin=True)
    assert registration_fails == [True]
    assert label["host_page_locked"] is False
    assert label["host_memory"].startswith("pageable") and "cudaHostRegister failed" in label["host_memory"]


def test_the_large_copy_gives_no_registered_figure_from_unregistered_memory(
    registration_fails: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    # the CUDA path's flags on a CPU: asked to pin (pin=True), registration failed, and torch's pinned
    # tensor not pinned either
    monkeypatch.setattr(
        stage_machine, "torch_pinned_source", lambda n, pin: (torch.ones(n, dtype=torch.uint8), False)
    )
    out = stage_machine.h2d_large(torch.device("cpu"), 1 << 16, pin=True)
    assert registration_fails == [True]
    assert out["registered_page_locked"] is False and out["registered_gb_per_s"] is None
    assert "cudaHostRegister failed" in out["registered_note"]
    assert out["torch_pinned_page_locked"] is False and out["torch_pinned_gb_per_s"] is None
    assert "is_pinned() is False" in out["torch_pinned_note"]
    assert out["pageable_gb_per_s"] > 0


def test_only_page_locked_sources_are_timed_under_their_names() -> None:
    buffer = torch.ones(1000, dtype=torch.uint8)
    timed: list[torch.Tensor] = []

    def seconds_of(src: torch.Tensor) -> float:
        timed.append(src)
        return 1e-6

    out = stage_machine.h2d_record(
        {
            "registered": (buffer, False, "cudaHostRegister failed"),
            "torch_pinned": (buffer.clone(), True, "-"),
        },
        buffer.clone(),
        True,
        seconds_of,
    )
    assert out["registered_gb_per_s"] is None and out["registered_page_locked"] is False
    assert out["torch_pinned_gb_per_s"] == pytest.approx(1000 / 1e-6 / 1e9)
    assert out["pageable_gb_per_s"] == pytest.approx(1000 / 1e-6 / 1e9)
    assert len(timed) == 2 and all(t is not buffer for t in timed)  # the unregistered buffer is never timed


def test_engine_copies_from_unregistered_memory_are_labelled_pageable(registration_fails: list[bool]) -> None:
    row = stage_machine.engine_copies(torch.device("cpu"), LAYOUT, budget_bytes=8 * LAYOUT.nbytes, pin=True)
    assert registration_fails == [True]
    assert row["host_page_locked"] is False and "cudaHostRegister failed" in row["host_memory"]
    assert row["wall_gb_per_s"] > 0


def test_the_machine_stage_imports_torch_and_the_runtime_inside_the_stage() -> None:
    for module in (stage_machine, stage_budget):
        names = vars(module)
        assert "torch" not in names and "offload" not in names, module.__name__
        assert not {"host_buffer", "OffloadConfig", "random_offloaded", "make_copy_engine"} & set(names)


def test_a_store_not_asked_to_pin_reports_no_pinned_bytes() -> None:
    store = HostExpertStore(LAYOUT, num_layers=2, num_experts=3, pin=False)
    weights = {
        "gate_up_proj": torch.randn(3, 2 * 8, 16),
        "down_proj": torch.randn(3, 16, 8),
    }
    store.fill_layer(0, weights)
    assert store.nbytes == 3 * LAYOUT.nbytes and store.pinned_nbytes == 0
    fields = host_memory_fields(store, torch.device("cpu"))
    assert fields == dict(
        host_store_bytes=store.nbytes, host_store_pinned_bytes=0, torch_pinned_allocator_bytes=None
    )


def test_the_store_counts_the_layers_it_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pinning works for the first layer and fails for the second: only the first counts as pinned."""
    results = iter([True, False])
    monkeypatch.setattr(
        "offload.memory.host_store.host_buffer",
        lambda nbytes, pin: (torch.zeros(nbytes, dtype=torch.uint8), pin and next(results)),
    )
    monkeypatch.setattr("offload.memory.host_store.unpin", lambda buffer: None)
    store = HostExpertStore(LAYOUT, num_layers=2, num_experts=3, pin=True)
    weights = {"gate_up_proj": torch.randn(3, 2 * 8, 16), "down_proj": torch.randn(3, 16, 8)}
    store.fill_layer(0, weights)
    store.fill_layer(1, weights)
    assert store.nbytes == 2 * 3 * LAYOUT.nbytes and store.pinned_nbytes == 3 * LAYOUT.nbytes
    store.release()
    assert store.pinned_nbytes == 0


def test_the_driver_sampler_keeps_the_peak_above_the_first_reading() -> None:
    readings = [100, 130, 500, 120]
    calls = iter(range(10**9))

    def read() -> int:
        i = next(calls)
        return readings[i] if i < len(readings) else 110

    with stage_budget.PeakSampler(read, interval=0.001) as sampler:
        deadline = time.monotonic() + 10
        while sampler.samples < len(readings) + 2 and time.monotonic() < deadline:
            time.sleep(0.002)
        assert sampler.running
    assert not sampler.running
    assert sampler.baseline == 100 and sampler.peak == 500 and sampler.peak_over_baseline == 400
    assert sampler.samples >= len(readings) + 2 and sampler.error is None


def test_the_driver_sampler_stops_when_the_row_raises() -> None:
    sampler = stage_budget.PeakSampler(lambda: 7, interval=0.001)
    with pytest.raises(RuntimeError, match="row failed"), sampler:
        raise RuntimeError("row failed")
    assert not sampler.running and sampler.baseline == 7


def test_the_driver_sampler_records_a_reading_that_raises() -> None:
    values = iter([5])

    def read() -> int:
        return next(values)  # StopIteration after the baseline

    with stage_budget.PeakSampler(read, interval=0.001) as sampler:
        deadline = time.monotonic() + 10
        while sampler.error is None and time.monotonic() < deadline:
            time.sleep(0.002)
    assert not sampler.running and sampler.error is not None and sampler.peak == 5


def test_a_budget_row_that_raises_leaves_no_sampler_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("load failed")

    monkeypatch.setattr("offload_bench.synthetic.random_offloaded", broken)
    with pytest.raises(RuntimeError, match="load failed"):
        stage_budget.measure(None, torch.device("cpu"), torch.float32, 1 << 30, 64, 0.25)
    assert not [t for t in threading.enumerate() if t.name == "driver-peak-sampler"]


def test_the_budget_stage_judges_reserved_memory(tmp_path: Path) -> None:
    part = Part(tmp_path / "budget.json", smoke=False)
    for fraction, reserved in ((0.25, 900), (0.5, 1100)):
        row = dict(
            slot_fraction=fraction, budget_bytes=1000, peak_allocated_bytes=800, peak_reserved_bytes=reserved
        )
        stage_budget.judge(part, row)
    targets = {t["target"]: t for t in json.loads(part.path.read_text())["targets"]}
    assert len(targets) == 4  # two per row: the rows' names differ, so neither verdict replaces the other
    allocated = targets["peak allocated device memory <= budget (0.5 of the experts in slots)"]
    assert allocated["status"] == "PASS" and allocated["value"] == 0.8
    reserved = targets["peak reserved device memory <= budget (0.5 of the experts in slots)"]
    assert reserved["status"] == "FAIL" and reserved["value"] == 1.1
    assert reserved["inputs"] == dict(budget_bytes=1000, slot_fraction=0.5, peak_reserved_bytes=1100)
    assert targets["peak reserved device memory <= budget (0.25 of the experts in slots)"]["status"] == "PASS"


def test_a_row_without_cuda_figures_is_not_judged(tmp_path: Path) -> None:
    part = Part(tmp_path / "budget.json", smoke=True)
    stage_budget.judge(part, dict(slot_fraction=0.125, budget_bytes=1000))
    targets = json.loads(part.path.read_text())["targets"]
    assert [t["status"] for t in targets] == ["N/A", "N/A"]
    assert all("no CUDA" in t["inputs"]["why"] for t in targets)
