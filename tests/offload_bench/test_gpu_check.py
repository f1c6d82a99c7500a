"""The GPU check cannot rot: its CPU smoke run goes through every stage at toy sizes and writes the keys a GPU
run writes, and a stage that fails or runs past its cap is recorded while the others still run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from offload_bench.gpu_check.driver import run_stage
from offload_bench.gpu_check.stage import STAGES
from tests.helpers import ROOT

# the smoke run's stages have wall-clock caps: run them alone, not beside other tests' workers
pytestmark = pytest.mark.serial

# What each stage writes, on a GPU and in the smoke run alike.
STAGE_KEYS = {
    "machine": {"device", "versions", "h2d", "h2d_expert_copies", "device_bandwidth"},
    "tests": {"device", "command", "tests", "counts"},
    "budget": {"device", "shape", "max_context", "rows"},
    "kernels": {"device", "dtype", "peak_bytes_per_s", "rows", "skipped"},
    "e2e": {"device", "runs", "results"},
    "host": {"device", "host_read_gbps", "host_read_peak_gbps", "rows", "int4pack_conversion", "e2e"},
}
RECORD_KEYS = {"status", "seconds", "cap_seconds", "targets", "log_tail"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, float]:
    out = tmp_path_factory.mktemp("gpu-check")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the stages set it themselves
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--out", str(out), "--smoke", "--commit", "test"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    seconds = time.monotonic() - began
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    return json.loads((out / "gpu-check.json").read_text()), (out / "gpu-check.md").read_text(), seconds


def test_smoke_runs_every_stage_and_writes_the_gpu_keys(smoke: tuple[dict[str, Any], str, float]) -> None:
    result, summary, _ = smoke
    assert result["device"] == "cpu" and result["smoke"] is True and result["commit"] == "test"
    assert list(result["stages"]) == list(STAGES)
    for name, stage in result["stages"].items():
        assert stage["status"] == "ok", (name, stage.get("error"), stage["log_tail"][-5:])
        assert STAGE_KEYS[name] | RECORD_KEYS <= set(stage), (name, sorted(set(stage)))
        assert f"## {name}" in summary
    stages = result["stages"]
    assert {t["outcome"] for t in stages["tests"]["tests"]} == {"skipped"}  # no CUDA here: collected, skipped
    assert len(stages["tests"]["tests"]) >= 10
    assert len(stages["budget"]["rows"]) == 3 and all("planned" in r for r in stages["budget"]["rows"])
    assert {r["impl"] for r in stages["kernels"]["rows"]} == {"triton", "torch-loop", "grouped_mm"}
    assert all(r["within_tolerance"] for r in stages["kernels"]["rows"])
    rows = stages["e2e"]["results"][0]["rows"]
    assert {r["variant"] for r in rows} == {"lru", "int4", "accelerate"}
    host = stages["host"]
    assert {(r["format"], r["tokens"]) for r in host["rows"]} == {("bf16", 1), ("int4", 1), ("mxfp4", 1)}
    assert all(r["gbps"] > 0 and 0 < r["share_of_read"] == r["gbps"] / r["read_gbps"] for r in host["rows"])
    conversion = host["int4pack_conversion"]
    assert {r["format"] for r in conversion["rows"]} == {"int4", "mxfp4"}
    assert conversion["fast_layout_blocks_of"] in (None, 32, 64) and "int4pack copy on" in summary
    split = {r["variant"]: r for r in host["e2e"]["rows"]}
    assert split["lru-host-off"]["host_compute"] == "off" and split["lru-host-off"]["on_host"] == 0
    assert split["lru"]["host_compute"] == "off"  # auto on a CPU device without given rates
    # every figure beside its target; the smoke run judges none of them
    assert result["targets"] and all(t["status"] == "N/A" for t in result["targets"])
    assert {t["stage"] for t in result["targets"]} >= {"budget", "kernels", "e2e", "host"}
    assert "| e2e | peak device memory <= budget" in summary


def test_a_failing_stage_is_recorded(tmp_path: Path) -> None:
    record = run_stage("budget", tmp_path, cap=2.0, smoke=True)  # far too short: stopped at its cap
    assert record["status"] == "timeout" and "cap of 2 s" in record["error"]
    assert record["seconds"] < 30


def test_a_stage_that_raises_records_its_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from offload_bench.gpu_check import stage, stage_machine

    def broken(part: Any, seconds: float) -> None:
        part.set(device="cpu")
        raise RuntimeError("no device here\nsecond line")

    monkeypatch.setattr(stage_machine, "run", broken)
    assert stage.main(["machine", "--part", str(tmp_path / "m.json"), "--smoke"]) == 1
    part = json.loads((tmp_path / "m.json").read_text())
    assert part["device"] == "cpu" and part["error"] == "RuntimeError: no device here"
