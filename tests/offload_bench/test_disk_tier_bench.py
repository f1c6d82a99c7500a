"""bench/disk_tier.py's smoke run end to end: the runs, the raw read beside them, the simulator's replay of a
demand-paging run count for count, and the targets with their values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT


def test_smoke_run(tmp_path: Path) -> None:
    out = tmp_path / "disk_tier.json"
    env = {**os.environ, "MOE_OFFLOAD_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "bench/disk_tier.py", "--smoke", "--workdir", str(tmp_path), "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["smoke"] is True and result["raw_direct_read"]["gb_per_s"] > 0
    assert (
        result["store_written"]["source"] == "written from the checkpoint, stored on disk for the next load"
    )
    rows = result["rows"]
    assert [(r["host_fraction"], r["prefetch"], r["disk_read_ahead"]) for r in rows] == [
        (0.25, "none", False),
        (1.0, "pre-attention", True),
    ]
    demand = rows[0]
    assert demand["store_source"] == "read from the disk store" and demand["total"]["disk_reads"] > 0
    assert demand["host_slots"] == 8 and demand["total_experts"] == 32  # a quarter of 4 layers x 8 experts
    assert demand["simulated"]["over_simulated"] == 1.0  # demand paging: replayed count for count
    assert {t["target"].split(" ")[0] for t in result["targets"]} == {"read", "disk"}
    assert all(isinstance(t["met"], bool) and t["value"] > 0 for t in result["targets"])
    assert not list(tmp_path.glob("disk-tier-*"))  # the work folder went
