"""Run the GPU check's stages one after another, each in its own process under its own time cap, then write
``gpu-check.json`` and ``gpu-check.md`` into ``--out``."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from offload_bench.gpu_check.part import clean_json, failures_of
from offload_bench.gpu_check.process_tree import kill_tree
from offload_bench.gpu_check.stage import FAILED, STAGES
from offload_bench.gpu_check.summary import write_summary

ROOT = Path(__file__).resolve().parents[2]
TOTAL_SECONDS = {False: 360.0, True: 160.0}  # the whole check: on a GPU, and the CPU smoke run
# Each stage's cap (seconds), on a GPU and in the smoke run; a stage never runs past what is left of the total.
# On a GPU the caps add up to 330 s, 30 s under the total: process start-up and the summary need their share.
# The e2e stage's rows were cut to fit its cap from estimates (docs/e2e.md); every stage keeps what it
# finished when its cap stops it. The smoke caps leave about 1.5 times a 2-core machine's time: CI machines
# run slower than this one, and a stage past its cap turns `make test` red.
CAPS = {
    "machine": (15, 12),
    "tests": (65, 36),
    "budget": (40, 24),
    "kernels": (55, 24),
    "e2e": (130, 36),
    "host": (25, 18),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/gpu_check.py", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu-check.json and gpu-check.md")
    parser.add_argument("--smoke", action="store_true", help="every stage at toy sizes on the CPU")
    parser.add_argument("--stages", help=f"comma-separated subset of: {', '.join(STAGES)} (default: all)")
    parser.add_argument("--commit", help="the commit checked (default: git rev-parse HEAD, if .git is there)")
    parser.add_argument(
        "--tests",
        action="append",
        help="tests stage: run the gpu tests of this file or node id instead of the default selection (repeatable)",
    )
    parser.add_argument(
        "--cap",
        action="append",
        default=[],
        metavar="STAGE=SECONDS",
        help="a stage's time cap instead of its default (still within what is left of the whole check)",
    )
    args = parser.parse_args(argv)
    stages = [s.strip() for s in (args.stages or ",".join(STAGES)).split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage {unknown[0]!r}; choose from {', '.join(STAGES)}")
    caps = {name: float(pair[args.smoke]) for name, pair in CAPS.items()}
    for given in args.cap:
        name, _, seconds = given.partition("=")
        if name not in STAGES or not seconds.replace(".", "", 1).isdigit():
            parser.error(f"--cap {given!r}: expected STAGE=SECONDS with STAGE one of {', '.join(STAGES)}")
        caps[name] = float(seconds)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    result: dict[str, Any] = dict(
        what="GPU check" + (": CPU smoke run at toy sizes, NOT performance" if args.smoke else ""),
        smoke=args.smoke,
        device="cpu" if args.smoke else None,
        command=" ".join(["python bench/gpu_check.py", *(sys.argv[1:] if argv is None else argv)]),
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        commit=args.commit or os.environ.get("GPU_CHECK_COMMIT") or git_commit(),
        host=dict(machine=platform.machine(), cpus=os.cpu_count(), python=platform.python_version()),
        total_cap_seconds=TOTAL_SECONDS[args.smoke],
        stages={},
        targets=[],
    )
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for name in stages:
            left = TOTAL_SECONDS[args.smoke] - (time.monotonic() - started)
            cap = min(caps[name], left - 2)
            if cap < 5:
                result["stages"][name] = dict(status="not run", error="the whole check's time is spent")
                continue
            result["stages"][name] = run_stage(name, Path(tmp), cap, args.smoke, args.tests)
            write(args.out, result, started)
    if not args.smoke:
        result["device"] = (result["stages"].get("machine", {}).get("device") or {}).get("name")
    for name, stage in result["stages"].items():
        result["targets"] += [dict(t, stage=name) for t in stage.get("targets", [])]
    write(args.out, result, started)
    print(f"wrote {args.out / 'gpu-check.json'} and gpu-check.md in {time.monotonic() - started:.0f} s")
    bad = {name: s["status"] for name, s in result["stages"].items() if s["status"] != "ok"}
    if bad:
        print(f"not ok: {', '.join(f'{name} {status}' for name, status in bad.items())}", file=sys.stderr)
    return 1 if bad else 0


def run_stage(
    name: str, tmp: Path, cap: float, smoke: bool, tests: list[str] | None = None
) -> dict[str, Any]:
    """The stage's own record, with its status, its time and its cap. Status: ok; failed (it ran and found
    something wrong: its ``failures``); error (it raised or crashed); timeout (stopped at its cap; what it
    finished is kept)."""
    part = tmp / f"{name}.json"
    cmd = [
        sys.executable,
        "-m",
        "offload_bench.gpu_check.stage",
        name,
        "--part",
        str(part),
        "--seconds",
        f"{cap:.0f}",
    ]
    if smoke:
        cmd.append("--smoke")
    cmd += [arg for test in tests or [] for arg in ("--tests", test)]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    )
    if smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""  # hides every GPU (unset would show them all): toy sizes on the CPU
    print(f"== {name} (cap {cap:.0f} s)", flush=True)
    began = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    tail: list[str] = []
    status = "ok"
    try:
        assert proc.stdout is not None
        deadline = began + cap
        os.set_blocking(proc.stdout.fileno(), False)
        while True:
            line = proc.stdout.readline()
            if line:
                print(f"[{name}] {line.rstrip()}", flush=True)
                tail = [*tail, line.rstrip()][-40:]
                continue
            if proc.poll() is not None:
                break
            if time.monotonic() > deadline:
                status = "timeout"
                kill_tree(proc.pid)
                proc.wait()
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait()
    record: dict[str, Any] = json.loads(part.read_text()) if part.is_file() else {}
    failures = failures_of(record)
    if status == "ok" and proc.returncode != 0:
        status = "failed" if proc.returncode == FAILED and failures else "error"
        if status == "error":
            record.setdefault("error", f"exit code {proc.returncode}")
    if status == "ok" and failures:  # the stage missed a failure it recorded: the record decides
        status = "failed"
    if failures:
        record["failures"] = failures
    if status == "timeout":
        record["error"] = f"stopped at its cap of {cap:.0f} s; what it finished is kept"
    record.update(
        status=status, seconds=round(time.monotonic() - began, 1), cap_seconds=round(cap), log_tail=tail
    )
    print(f"== {name}: {status} in {record['seconds']} s", flush=True)
    return record


def git_commit() -> str:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 else "unknown (no git checkout: pass --commit)"


def write(out: Path, result: dict[str, Any], started: float) -> None:
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    tmp = out / "gpu-check.json.tmp"
    tmp.write_text(json.dumps(clean_json(result), indent=1, default=str) + "\n")
    tmp.replace(out / "gpu-check.json")
    write_summary(out / "gpu-check.md", result)
