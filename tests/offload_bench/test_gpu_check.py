"""The GPU check cannot rot: its CPU smoke run goes through every stage at toy sizes and writes the keys a GPU
run writes, and a stage that fails or runs past its cap is recorded while the others still run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from offload_bench.gpu_check.driver import run_stage
from offload_bench.gpu_check.stage import STAGES
from offload_bench.gpu_check.stage_tests import ALSO, LAST
from tests.helpers import ROOT

# the smoke run's stages have wall-clock caps: run them alone, not beside other tests' workers
pytestmark = pytest.mark.serial

# What each stage writes, on a GPU and in the smoke run alike.
STAGE_KEYS = {
    "machine": {"device", "versions", "h2d", "h2d_expert_copies", "device_bandwidth"},
    "tests": {"device", "command", "tests", "counts", "collected", "cuda_visible_devices"},
    "budget": {"device", "shape", "max_context", "rows"},
    "kernels": {"device", "dtype", "peak_bytes_per_s", "rows", "skipped"},
    "e2e": {"device", "runs", "results"},
    "host": {"device", "host_read_gbps", "host_read_peak_gbps", "rows", "int4pack_conversion"},
}
RECORD_KEYS = {"status", "seconds", "cap_seconds", "targets", "log_tail"}


# The GPU image lacks these: nothing the check runs may import them (a sitecustomize refuses them here).
NOT_ON_THE_GPU_IMAGE = ("fastapi", "uvicorn", "openai", "ray")
REFUSE = f"""
import importlib.abc
import sys


class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {NOT_ON_THE_GPU_IMAGE!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not on the GPU image)")
        return None


sys.meta_path.insert(0, Refuse())
"""


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, float]:
    out = tmp_path_factory.mktemp("gpu-check")
    refuse = tmp_path_factory.mktemp("refuse")
    (refuse / "sitecustomize.py").write_text(REFUSE)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the stages set it themselves
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(refuse), env.get("PYTHONPATH")) if p)
    env["CUDA_VISIBLE_DEVICES"] = "0"  # the smoke run must hide it again
    refused = subprocess.run(
        [sys.executable, "-c", "import fastapi"], env=env, capture_output=True, text=True
    )
    assert "not on the GPU image" in refused.stderr  # the refusal is in force for what the check starts
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
    tests = stages["tests"]
    assert {t["outcome"] for t in tests["tests"]} == {"skipped"}  # no CUDA here: collected, skipped
    assert tests["cuda_visible_devices"] == "" and not tests["missing_named_tests"]
    assert len(tests["tests"]) == tests["collected"] >= 60 and tests["counts"]["not_run"] == 0
    ran = [t["test"] for t in tests["tests"]]
    assert any(t.startswith(ALSO[0]) for t in ran) and ran[-1].startswith(LAST[0])  # the slowest last
    assert len(stages["budget"]["rows"]) == 3 and all("planned" in r for r in stages["budget"]["rows"])
    assert {r["impl"] for r in stages["kernels"]["rows"]} == {"triton", "torch-loop", "grouped_mm"}
    assert all(r["within_tolerance"] for r in stages["kernels"]["rows"])
    rows = stages["e2e"]["results"][0]["rows"]
    assert [r["variant"] for r in rows] == ["lru", "lru-host-off", "int4", "int4-disk", "accelerate"]
    disk = rows[3]
    assert disk["host_tier_slots"] and disk["decode"]["disk_reads"] >= disk["decode"]["host_tier_misses"]
    estimates = [r["estimate"] for r in rows]
    assert all(math.isclose(e["total_s"], e["build_s"] + e["run_s"], abs_tol=1e-9) for e in estimates)
    split = {r["variant"]: r for r in rows}
    assert split["lru-host-off"]["host_compute"] == "off"
    assert split["lru-host-off"]["decode"]["host_expert_calls"] == 0
    assert split["lru"]["host_compute"] == "off"  # auto on a CPU device without given rates
    host = stages["host"]
    assert {(r["format"], r["tokens"]) for r in host["rows"]} == {("bf16", 1), ("int4", 1), ("mxfp4", 1)}
    assert all(r["gbps"] > 0 and 0 < r["share_of_read"] == r["gbps"] / r["read_gbps"] for r in host["rows"])
    conversion = host["int4pack_conversion"]
    assert {r["format"] for r in conversion["rows"]} == {"int4", "mxfp4"}
    assert conversion["fast_layout_blocks_of"] in (None, 32, 64) and "int4pack copy on" in summary
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


# The mark spelled so that this file does not look gpu-marked to the tests stage's file scan.
PLANTED = """
import time

import pytest

gpu = getattr(pytest.mark, "gpu")


@gpu
def test_passes():
    pass


@gpu
def test_fails():
    assert 1 == 2, "planted failure"


def test_not_gpu_marked():  # not selected
    pass


@gpu
def test_hangs():
    time.sleep(600)


@gpu
def test_never_started():
    pass
"""


def test_a_failed_and_a_hung_test_fail_the_check_and_keep_what_finished(tmp_path: Path) -> None:
    """Issue 24, items 1 and 2: a failing test and a hanging one. The check exits non-zero after writing both
    files; the stage says "failed" with its counts; the outcomes of the tests that ended before the cap are
    kept, the test the cap stopped is named, and the one never started is counted."""
    planted = tmp_path / "planted" / "test_planted.py"
    planted.parent.mkdir()
    planted.write_text(PLANTED)
    out = tmp_path / "out"
    cmd = [sys.executable, "bench/gpu_check.py", "--out", str(out), "--smoke", "--commit", "test",
           "--stages", "tests", "--tests", str(planted), "--cap", "tests=15"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-2000:]
    assert "not ok: tests failed" in done.stderr
    stage = json.loads((out / "gpu-check.json").read_text())["stages"]["tests"]
    assert stage["status"] == "failed"
    outcomes = {t["test"].rpartition("::")[2]: t["outcome"] for t in stage["tests"]}
    assert outcomes == {"test_passes": "passed", "test_fails": "failed", "test_hangs": "timeout"}
    assert stage["counts"] == {"passed": 1, "failed": 1, "timeout": 1, "not_run": 1}
    assert stage["collected"] == 4  # the unmarked test is not selected
    failures = " ".join(stage["failures"])
    assert "planted failure" in failures and "test_hangs" in failures and "1 of 4 tests not run" in failures
    summary = (out / "gpu-check.md").read_text()
    assert "NOT OK: tests failed" in summary and "FAILED" in summary and "TIMEOUT" in summary


def test_an_empty_test_run_fails_the_stage(tmp_path: Path) -> None:
    from offload_bench.gpu_check import stage

    empty = tmp_path / "test_nothing.py"
    empty.write_text("def helper():\n    pass\n")
    part = tmp_path / "tests.json"
    code = stage.main(["tests", "--part", str(part), "--smoke", "--seconds", "60", "--tests", str(empty)])
    record = json.loads(part.read_text())
    assert code == stage.FAILED and record["collected"] == 0
    assert record["failures"] == ["no test collected [0 not_run]"]


def test_a_missing_pytest_fails_the_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from offload_bench.gpu_check import stage

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "pytest" else real(name, *a)
    )
    part = tmp_path / "tests.json"
    assert stage.main(["tests", "--part", str(part), "--smoke"]) == stage.FAILED
    assert json.loads(part.read_text())["failures"] == ["pytest is not installed: no test ran"]


def test_a_stage_that_cannot_import_records_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A package the GPU image lacks fails that stage alone, with its error: the import is inside the try."""
    from offload_bench.gpu_check import stage

    monkeypatch.setitem(sys.modules, "offload_bench.gpu_check.stage_kernels", None)  # its import fails
    part = tmp_path / "k.json"
    assert stage.main(["kernels", "--part", str(part), "--smoke"]) == 1
    error = json.loads(part.read_text())["error"]
    assert error.startswith("ModuleNotFoundError: import of offload_bench.gpu_check.stage_kernels halted")


def test_the_gpu_caps_leave_30_s_for_start_up_and_the_summary() -> None:
    from offload_bench.gpu_check.driver import CAPS, TOTAL_SECONDS

    assert set(CAPS) == set(STAGES)
    assert sum(gpu for gpu, _ in CAPS.values()) <= TOTAL_SECONDS[False] - 30
    assert sum(smoke for _, smoke in CAPS.values()) <= TOTAL_SECONDS[True]


def test_the_committed_e2e_plan_is_the_stage_s_and_fits_its_cap() -> None:
    """The estimates docs/e2e.md shows were made for exactly the rows the stage runs, and they fit its cap
    with its margin and 15 s for start-up and each run's link measurement."""
    from offload_bench.gpu_check.driver import CAPS
    from offload_bench.gpu_check.stage_e2e import MARGIN_S, runs

    total = 0.0
    for argv in runs(False):
        shape = argv[argv.index("--shapes") + 1]
        plan = json.loads((ROOT / f"bench/results/gpu_check_e2e_estimate-{shape}.json").read_text())
        assert plan["command"].split(" --estimate-only")[0] == " ".join(["python bench/e2e.py", *argv])
        total += sum(r["estimate"]["total_s"] for r in plan["rows"])
    assert total + 15 <= CAPS["e2e"][0] - MARGIN_S[False]


def _part(tmp_path: Path) -> Any:
    from offload_bench.gpu_check.part import Part

    part = Part(tmp_path / "part.json", smoke=False)
    part.set(rows=[])
    return part


def test_kernel_rows_are_judged_as_they_come_and_a_wrong_or_failed_cell_fails(tmp_path: Path) -> None:
    from offload_bench.gpu_check import stage_kernels
    from offload_bench.gpu_check.part import failures_of

    part = _part(tmp_path)
    row = dict(model="m", tokens=1, impl="triton", format="float", pct_peak=80.0, kernel_us=1.0, call_us=2.0)
    part.add("rows", dict(row, within_tolerance=True, max_abs_err_vs_torch=1e-3))
    stage_kernels.judge(part)
    verdicts = {t["target"]: t["status"] for t in part.data["targets"]}
    assert verdicts["Triton bf16 output within tolerance of the torch reference"] == "PASS"
    assert verdicts[">= 75% of measured HBM peak (m, 1 tokens)"] == "PASS" and not failures_of(part.data)
    part.add("rows", dict(row, tokens=256, error="RuntimeError: launch failed"))  # a cell that raised
    stage_kernels.judge(part)
    tolerance = part.data["targets"][0]  # judged again, in place
    assert tolerance["status"] == "FAIL" and tolerance["value"] == "1 of 2 cells" and tolerance["invariant"]
    assert failures_of(part.data) == [
        "Triton bf16 output within tolerance of the torch reference: 1 of 2 cells"
    ]


def test_e2e_rows_are_judged_as_they_come_and_a_peak_over_budget_fails(tmp_path: Path) -> None:
    from offload_bench.gpu_check import stage_e2e
    from offload_bench.gpu_check.part import failures_of

    lru = dict(
        shape="s", variant="lru", status="ran", time_over_floor=1.1, s_per_token=0.11,
        demand_missed_bytes_per_token=1e9, floor_s_per_token=0.1, notes=[], decode_tok_per_s=9.0,
        budget_bytes=100, peak_device_bytes=90,
    )  # fmt: skip
    part = _part(tmp_path)
    stage_e2e.judge(part, [dict(rows=[lru])])  # after the first row: its own targets, none needing others
    assert {t["target"] for t in part.data["targets"]} == {
        "decode time per token <= 1.2 x floor (s, lru)",
        "peak device memory <= budget (s, lru)",
    }
    assert not failures_of(part.data)
    over = dict(lru, variant="pre-attention", peak_device_bytes=101)
    peer = dict(shape="s", variant="accelerate", status="ran", decode_tok_per_s=1.0, cap_bytes=100)
    stage_e2e.judge(part, [dict(rows=[lru, over, peer])])
    verdicts = {t["target"]: t["status"] for t in part.data["targets"]}
    assert verdicts["decode tok/s >= 4 x accelerate's (s, lru)"] == "PASS"
    assert failures_of(part.data) == ["peak device memory <= budget (s, pre-attention): 1.01"]
