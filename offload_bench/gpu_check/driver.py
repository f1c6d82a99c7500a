"""Run the GPU check's stages one after another, each in its own process under its own time cap, then write
``gpu-check.json`` and ``gpu-check.md`` into ``--out``."""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from offload_bench.gpu_check.part import clean_json
from offload_bench.gpu_check.stage import STAGES
from offload_bench.gpu_check.summary import write_summary

ROOT = Path(__file__).resolve().parents[2]
TOTAL_SECONDS = {False: 360.0, True: 160.0}  # the whole check: on a GPU, and the CPU smoke run
# Each stage's cap (seconds), on a GPU and in the smoke run; a stage never runs past what is left of the total.
# The smoke caps leave about 1.5 times a 2-core machine's time (6, 19, 13, 12, 16, 16 s: 82 s in all): CI
# machines run slower than this one, and a stage past its cap turns `make test` red.
CAPS = {
    "machine": (25, 12),
    "tests": (70, 36),
    "budget": (50, 24),
    "kernels": (85, 24),
    "e2e": (100, 26),
    "host": (30, 26),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/gpu_check.py", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu-check.json and gpu-check.md")
    parser.add_argument("--smoke", action="store_true", help="every stage at toy sizes on the CPU")
    parser.add_argument("--stages", help=f"comma-separated subset of: {', '.join(STAGES)} (default: all)")
    parser.add_argument("--commit", help="the commit checked (default: git rev-parse HEAD, if .git is there)")
    args = parser.parse_args(argv)
    stages = [s.strip() for s in (args.stages or ",".join(STAGES)).split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage {unknown[0]!r}; choose from {', '.join(STAGES)}")
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
            cap = min(float(CAPS[name][args.smoke]), left - 2)
            if cap < 5:
                result["stages"][name] = dict(status="not run", error="the whole check's time is spent")
                continue
            result["stages"][name] = run_stage(name, Path(tmp), cap, args.smoke)
            write(args.out, result, started)
    if not args.smoke:
        result["device"] = (result["stages"].get("machine", {}).get("device") or {}).get("name")
    for name, stage in result["stages"].items():
        result["targets"] += [dict(t, stage=name) for t in stage.get("targets", [])]
    write(args.out, result, started)
    print(f"wrote {args.out / 'gpu-check.json'} and gpu-check.md in {time.monotonic() - started:.0f} s")
    return 0 if all(s["status"] == "ok" for s in result["stages"].values()) else 1


def run_stage(name: str, tmp: Path, cap: float, smoke: bool) -> dict[str, Any]:
    """The stage's own record, with its status (ok, error, timeout), its time and its cap."""
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
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    )
    if smoke:
        env.pop("CUDA_VISIBLE_DEVICES", None)
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
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    record: dict[str, Any] = json.loads(part.read_text()) if part.is_file() else {}
    for i, extra in enumerate(record.get("partial_outputs", [])):  # rows a cut-short stage wrote elsewhere
        if Path(extra).is_file() and len(record.get("results", [])) <= i:
            record.setdefault("results", []).append(json.loads(Path(extra).read_text()))
    if status == "ok" and proc.returncode != 0:
        status = "error"
        record.setdefault("error", f"exit code {proc.returncode}")
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
