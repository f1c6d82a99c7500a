"""A pytest plugin for the GPU check's ``tests`` stage (``-p offload_bench.gpu_check.pytest_outcomes``): it picks
the tests, orders them, and writes each one's outcome to a JSON-lines file the moment it ends, so a run killed
at its time cap keeps every result it had (pytest's JUnit report is written only at the very end).

Selection (only with ``--gpu-check-outcomes``): every ``gpu``-marked test, plus the tests named by
``--gpu-check-also`` (node ids; a name without ``[...]`` takes every parametrization); a name that matches
nothing is reported, so a renamed test cannot drop out unseen. ``--gpu-check-last`` names tests to run after
all others (the slowest, so a cap cuts it rather than the tests behind it). ``--gpu-check-skip-also REASON``
collects the named tests but skips them (the CPU smoke run: they run in ``make test`` itself).

One JSON object per line, ``event`` one of: ``collected`` (count, missing names), ``collect_error``,
``start`` (a test began), ``end`` (test, outcome, seconds, message), ``finish`` (pytest's exit status).
Outcomes: passed, failed, error (setup or teardown failed), skipped, xfailed, xpassed.
"""

from __future__ import annotations

import json
import time
from typing import IO, Any

import pytest

_state: dict[str, Any] = {"file": None, "reports": {}, "started": {}}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gpu-check")
    group.addoption("--gpu-check-outcomes", help="JSON-lines file: one line per test as it ends")
    group.addoption("--gpu-check-also", action="append", default=[], help="node id run beside the gpu tests")
    group.addoption("--gpu-check-last", action="append", default=[], help="node id run after all others")
    group.addoption("--gpu-check-skip-also", help="skip the --gpu-check-also tests with this reason")


def _matches(nodeid: str, name: str) -> bool:
    return nodeid == name or nodeid.startswith(name + "[")


def _write(event: str, **fields: Any) -> None:
    out: IO[str] | None = _state["file"]
    if out is not None:
        out.write(json.dumps(dict(event=event, **fields), default=str) + "\n")
        out.flush()  # in the kernel's page cache at once: a SIGKILL after this loses nothing


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("--gpu-check-outcomes")
    if path:
        _state["file"] = open(path, "a", encoding="utf-8")  # noqa: SIM115  # closed in pytest_unconfigure


def pytest_unconfigure(config: pytest.Config) -> None:
    out = _state["file"]
    if out is not None:
        out.close()
        _state["file"] = None


@pytest.hookimpl(tryfirst=True)  # before tests/conftest.py adds its "needs a CUDA device" skips
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _state["file"] is None:
        return
    also: list[str] = config.getoption("--gpu-check-also")
    last: list[str] = config.getoption("--gpu-check-last")
    missing = [name for name in [*also, *last] if not any(_matches(i.nodeid, name) for i in items)]
    named = [i for i in items if any(_matches(i.nodeid, name) for name in also)]
    kept = [i for i in items if "gpu" in i.keywords or i in named]
    dropped = [i for i in items if i not in kept]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    reason = config.getoption("--gpu-check-skip-also")
    if reason:
        for item in named:
            if "gpu" not in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))
    is_last = [i for i in kept if any(_matches(i.nodeid, name) for name in last)]
    items[:] = [i for i in kept if i not in is_last] + is_last
    _write("collected", count=len(items), missing=missing, last=[i.nodeid for i in is_last])


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.failed:
        _write("collect_error", test=report.nodeid, message=_first_line(report))


def pytest_runtest_logstart(nodeid: str, location: tuple[str, int | None, str]) -> None:
    _state["started"][nodeid] = time.monotonic()
    _state["reports"][nodeid] = []
    _write("start", test=nodeid)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _state["reports"].setdefault(report.nodeid, []).append(report)


def pytest_runtest_logfinish(nodeid: str, location: tuple[str, int | None, str]) -> None:
    reports: list[pytest.TestReport] = _state["reports"].pop(nodeid, [])
    outcome, message = _outcome(reports)
    seconds = time.monotonic() - _state["started"].pop(nodeid, time.monotonic())
    _write("end", test=nodeid, outcome=outcome, seconds=round(seconds, 3), message=message)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _write("finish", exit_status=int(exitstatus))


def _outcome(reports: list[pytest.TestReport]) -> tuple[str, str]:
    """One outcome for a test's setup, call and teardown reports: a failure anywhere wins."""
    for report in reports:
        if report.failed:
            return ("failed" if report.when == "call" else "error"), _first_line(report)
    for report in reports:
        if hasattr(report, "wasxfail"):
            return ("xfailed" if report.skipped else "xpassed"), str(report.wasxfail)
        if report.skipped:
            return "skipped", _first_line(report)
    return ("passed", "") if reports else ("error", "no report")


def _first_line(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple):  # a skip: (file, line, reason)
        return str(longrepr[2])[:300]
    crash = getattr(longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(longrepr or "")
    lines = text.strip().splitlines()
    return lines[0][:300] if lines else ""
