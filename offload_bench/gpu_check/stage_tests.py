"""Stage ``tests``: the gpu-marked tests, pass or fail per test (pytest's JUnit report, parsed).

Only the test files that mark gpu tests (``pytest.mark.gpu``, or the ``DEVICES`` parametrization of
tests/conftest.py) are collected: collecting the rest (every architecture of transformers, for one) would
cost the stage's time for tests it deselects anyway.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from offload_bench.gpu_check.part import Part

ROOT = Path(__file__).resolve().parents[2]
MARKS_GPU = re.compile(r"pytest\.mark\.gpu|\bDEVICES\b")


def gpu_test_files() -> list[str]:
    tests = ROOT / "tests"
    return sorted(
        str(p.relative_to(ROOT)) for p in tests.rglob("test_*.py") if MARKS_GPU.search(p.read_text())
    )


def run(part: Part, seconds: float) -> None:
    import torch

    part.set(device="cuda" if torch.cuda.is_available() and not part.smoke else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "gpu",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={report}",
            *gpu_test_files(),  # on the CPU every one is skipped: collecting them is what can rot
        ]
        part.set(command=" ".join(cmd[1:]))
        try:
            done = subprocess.run(
                cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(10.0, seconds - 5)
            )
            part.set(exit_code=done.returncode, output_tail=done.stdout[-3000:] + done.stderr[-2000:])
        except subprocess.TimeoutExpired as exc:
            part.set(exit_code=None, timed_out=True, output_tail=str(exc.stdout or "")[-3000:])
        tests = parse_junit(report) if report.is_file() else []
    counts: dict[str, int] = {}
    for t in tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    part.set(tests=tests, counts=counts)


def parse_junit(path: Path) -> list[dict]:
    out = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (
                    (found.get("message") or found.text or "").strip().splitlines()[0][:300]
                    if (found.get("message") or found.text)
                    else ""
                )
                break
        out.append(
            dict(
                test=f"{case.get('classname')}::{case.get('name')}",
                outcome=outcome,
                seconds=float(case.get("time") or 0),
                message=message,
            )
        )
    return out
