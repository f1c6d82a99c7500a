"""Stage ``tests``: the gpu-marked tests, and a named subset of the tests that use CUDA where it is present
without being gpu-marked (the kernel grids), each test's outcome recorded the moment it ends.

Only the test files that hold those tests are collected: collecting the rest (every architecture of
transformers, for one) would cost the stage's time for tests it deselects anyway. The slowest test runs last, so
the cap cuts it rather than the tests behind it. pytest runs under the stage's cap less a margin; a run stopped
there keeps every finished test's outcome, names the test it stopped in, and counts those never started.

The stage fails (exit status 3, ``failed`` in the summary) when pytest is missing, a test file does not
collect, no test is collected, a named test no longer exists, a test fails or errors, the cap stops the run,
or, on a GPU, not one test passed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from offload_bench.gpu_check.part import Part
from offload_bench.gpu_check.process_tree import kill_tree

ROOT = Path(__file__).resolve().parents[2]
MARKS_GPU = re.compile(r"pytest\.mark\.gpu|\bDEVICES\b")
PLUGIN = "offload_bench.gpu_check.pytest_outcomes"
# Not gpu-marked, but on CUDA where it is present: the kernel grids over shapes, formats and dtypes, and
# generation through the Triton kernels against the torch path.
ALSO = (
    "tests/offload/kernels/test_kernels.py::test_shapes",
    "tests/offload/kernels/test_kernels.py::test_generate_triton_equals_torch",
    "tests/offload/kernels/test_compressed_kernels.py::test_every_format_and_compute_dtype",
    "tests/offload/kernels/test_compressed_kernels.py::test_generate_int4_triton_equals_torch",
)
# The slowest: Qwen3-30B-A3B's expert shapes, about 1.2 GB of host stores drawn with randn.
LAST = ("tests/offload/kernels/test_kernels.py::test_gpu_realistic_shapes",)
SMOKE_SKIP = "CPU smoke run: make test runs these itself (in Triton's interpreter)"
POLL_SECONDS = 0.5


def gpu_test_files() -> list[str]:
    tests = ROOT / "tests"
    return sorted(
        str(p.relative_to(ROOT)) for p in tests.rglob("test_*.py") if MARKS_GPU.search(p.read_text())
    )


def command(outcomes: Path, smoke: bool, tests: list[str] | None) -> list[str]:
    """pytest's command line: the default selection, or ``tests`` (files or node ids) in its place."""
    files = tests or sorted({*gpu_test_files(), *(name.split("::")[0] for name in (*ALSO, *LAST))})
    named = [] if tests else [arg for name in ALSO for arg in ("--gpu-check-also", name)]
    last = [] if tests else [arg for name in LAST for arg in ("--gpu-check-last", name)]
    skip = ["--gpu-check-skip-also", SMOKE_SKIP] if smoke and not tests else []
    return [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", PLUGIN,
        "--gpu-check-outcomes", str(outcomes), *named, *last, *skip, *files,
    ]  # fmt: skip


def run(part: Part, seconds: float, tests: list[str] | None = None) -> None:
    import torch

    gpu = torch.cuda.is_available() and not part.smoke
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # the smoke run hides every GPU with ""
    part.set(device="cuda" if gpu else "cpu", cuda_visible_devices=visible, command=None, tests=[], counts={})
    if importlib.util.find_spec("pytest") is None:
        part.fail("pytest is not installed: no test ran")
        return
    margin = min(10.0, 0.15 * seconds)  # to stop pytest, read its last lines and hand over
    with tempfile.TemporaryDirectory() as tmp:
        outcomes, output = Path(tmp) / "outcomes.jsonl", Path(tmp) / "output.txt"
        cmd = command(outcomes, part.smoke, tests)
        part.set(command=" ".join(cmd[1:]))
        with output.open("w") as sink:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, text=True, start_new_session=True
            )
            log = OutcomeLog(outcomes)
            stopped = False
            try:
                while proc.poll() is None:
                    if log.read():
                        part.set(**log.record())
                    if part.elapsed() > seconds - margin:
                        stopped = True
                        break
                    time.sleep(POLL_SECONDS)
            finally:
                if proc.poll() is None:
                    kill_tree(proc.pid)
                    proc.wait()
        log.read()
        stopped_at = time.monotonic() if stopped else None
        part.set(
            **log.record(stopped_at),
            exit_code=None if stopped else proc.returncode,
            output_tail=output.read_text(errors="replace")[-4000:],
        )
    for reason in judge(log, proc.returncode, stopped_at, seconds - margin, gpu):
        part.fail(reason)


class OutcomeLog:
    """What the plugin's JSON-lines file says so far."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.collected: int | None = None
        self.missing: list[str] = []
        self.collect_errors: list[dict[str, Any]] = []
        self.running: dict[str, float] = {}  # test -> when it started (this process's clock)
        self.ended: list[dict[str, Any]] = []
        self.finished = False

    def read(self) -> bool:
        """Take in the lines written since the last read (whole lines only); True if there were any."""
        if not self.path.is_file():
            return False
        with self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        whole = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(whole)
        for line in whole.decode().splitlines():
            event = json.loads(line)
            kind = event.pop("event")
            if kind == "collected":
                self.collected, self.missing = event["count"], event["missing"]
            elif kind == "collect_error":
                self.collect_errors.append(event)
            elif kind == "start":
                self.running[event["test"]] = time.monotonic()
            elif kind == "end":
                self.running.pop(event["test"], None)
                self.ended.append(event)
            elif kind == "finish":
                self.finished = True
        return bool(whole)

    def record(self, stopped_at: float | None = None) -> dict[str, Any]:
        """The stage's ``tests`` and ``counts``; with ``stopped_at``, the test cut short is one more test."""
        tests = list(self.ended)
        if stopped_at is not None:
            tests += [
                dict(
                    test=t,
                    outcome="timeout",
                    seconds=round(stopped_at - began, 3),
                    message="stopped at the cap",
                )
                for t, began in self.running.items()
            ]
        counts: dict[str, int] = {}
        for t in tests:
            counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
        if self.collected is not None:
            counts["not_run"] = self.collected - len(tests)
        return dict(
            tests=tests,
            counts=counts,
            collected=self.collected,
            running=list(self.running),
            missing_named_tests=self.missing,
            collect_errors=self.collect_errors,
        )


def judge(
    log: OutcomeLog, exit_code: int | None, stopped_at: float | None, limit: float, gpu: bool
) -> list[str]:
    """Why the test run failed, if it did: every reason, not just the first."""
    record = log.record(stopped_at)
    stopped = stopped_at is not None
    counts = record["counts"]
    reasons = []
    if log.collect_errors:
        first = log.collect_errors[0]
        reasons.append(
            f"{len(log.collect_errors)} test files did not collect ({first['test']}: {first['message']})"
        )
    if log.missing:
        reasons.append(f"named tests not found: {', '.join(log.missing)}")
    if stopped:
        cut = [t["test"] for t in record["tests"] if t["outcome"] == "timeout"]
        reasons.append(
            f"stopped after {limit:.0f} s in {', '.join(cut) or 'no test'}; "
            f"{counts.get('not_run', '?')} of {log.collected} tests not run"
        )
    elif log.collected is None:
        reasons.append(f"pytest collected nothing (exit code {exit_code}); see output_tail")
    elif log.collected == 0:
        reasons.append("no test collected")
    bad = [t for t in record["tests"] if t["outcome"] in ("failed", "error")]
    if bad:
        reasons.append(
            f"{len(bad)} of {len(record['tests'])} tests failed or errored "
            f"(first: {bad[0]['test']}: {bad[0]['message']})"
        )
    if not stopped and exit_code not in (0, None) and not bad and not reasons:
        reasons.append(f"pytest exited with code {exit_code}; see output_tail")
    if gpu and not stopped and log.collected and not counts.get("passed"):
        reasons.append(f"no test passed on the GPU ({counts}): is the device visible to pytest?")
    summary = ", ".join(f"{n} {k}" for k, n in counts.items())
    return [f"{r} [{summary}]" for r in reasons]
