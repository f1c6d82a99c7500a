"""bench/e2e.py's CPU smoke run end to end: every row and target is there, and its numbers add up.

The smoke run's timings mean nothing; what is checked is the bookkeeping a GPU run relies on: counters that
account for every expert use and every byte copied, the floor computed from the reported bytes and
bandwidth, and targets that carry the numbers they were judged on.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from typing import Any

import pytest
import torch

from tests.helpers import ROOT

BENCH = ROOT / "bench" / "e2e.py"
# smoke shape: whether its routing is forced from the shared OLMoE trace
SHAPES = {"mixtral-tiny": False, "qwen3-tiny": False, "olmoe-tiny": True}
OURS = ("lru", "lookahead", "pre-attention", "int4")


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("e2e") / "smoke.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=150,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def rows_of(result: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["shape"], r["variant"]): r for r in result["rows"]}


def test_smoke_is_labelled_and_records_the_run(smoke: tuple[dict[str, Any], str]) -> None:
    result, stdout = smoke
    assert result["smoke"] is True and result["complete"] is True
    assert "CPU smoke run: not performance" in result["what"]
    assert result["command"].startswith("python bench/e2e.py --smoke --out ")
    assert result["device"].startswith("cpu")
    assert {"torch", "transformers", "accelerate", "cuda"} <= set(result["versions"])
    assert result["versions"]["torch"] == torch.__version__
    assert result["date"] and result["h2d_peak"]["bytes_per_s"] > 0
    assert "not performance" in result["h2d_peak"]["how"]
    assert set(result["shapes"]) == set(SHAPES)
    olmoe = result["shapes"]["olmoe-tiny"]
    assert (olmoe["moe_layers"], olmoe["experts_per_layer"], olmoe["top_k"]) == (16, 64, 8)  # the trace's
    for name, forced in SHAPES.items():
        assert result["shapes"][name]["routing"].startswith("forced" if forced else "random")
        assert "truncated" not in result["shapes"][name]["host_plan"]
    assert "wrote" in stdout and stdout.count("olmoe-tiny") >= 4  # a table line per row


def test_every_variant_has_a_row(smoke: tuple[dict[str, Any], str]) -> None:
    result, _ = smoke
    rows = rows_of(result)
    assert len(rows) == len(result["rows"]) == len(SHAPES) * 5
    for shape in SHAPES:
        for variant in OURS:
            assert rows[shape, variant]["status"] == "ran", rows[shape, variant]
        int4, bf16 = rows[shape, "int4"], rows[shape, "lru"]
        assert int4["expert_format"] == "int4" and bf16["expert_format"] in ("bf16", "fp32")  # smoke: fp32
        # the same budget holds more int4 experts (at tiny shapes, 256-byte field alignment takes much of it)
        assert int4["expert_bytes"] < bf16["expert_bytes"] and int4["budget_bytes"] == bf16["budget_bytes"]
        assert int4["slots"] > bf16["slots"]
        peer = rows[shape, "accelerate"]
        assert peer["status"] == "skipped" and "GPU" in peer["reason"]  # the stated reason
        assert peer["model_bytes"] > 0  # the random-weight model was built all the same


@pytest.mark.parametrize("shape", list(SHAPES))
def test_counters_account_for_every_use_and_byte(smoke: tuple[dict[str, Any], str], shape: str) -> None:
    result, _ = smoke
    rows = rows_of(result)
    peak = result["h2d_peak"]["bytes_per_s"]
    for variant in OURS:
        r = rows[shape, variant]
        d = r["decode"]
        # Decode: one token per step, so every layer uses exactly top-k distinct experts per token.
        uses = r["decode_tokens"] * r["layers"] * r["top_k"]
        assert d["expert_hits"] + d["expert_misses"] == d["expert_uses"] == uses
        assert close(d["hit_rate"], d["expert_hits"] / uses)
        assert d["layer_calls"] == r["decode_tokens"] * r["layers"]
        # Every copy is one expert, for a demand miss or a prefetch.
        for phase in (r["decode"], r["prefill"]):
            copied = phase["expert_misses"] + phase["prefetch_issued"]
            assert phase["bytes_host_to_device"] == copied * r["expert_bytes"]
            assert phase["prefetch_used"] + phase["prefetch_late"] <= phase["prefetch_issued"]
            assert phase["prefetch_wasted"] <= phase["prefetch_issued"]
            if phase["copy_seconds"] == 0:  # int4: the same budget may hold every expert of a tiny shape
                assert phase["bytes_host_to_device"] == 0 and phase["copy_gb_per_s"] is None
                continue
            assert close(phase["copy_gb_per_s"], phase["bytes_host_to_device"] / phase["copy_seconds"] / 1e9)
            assert close(phase["copy_fraction_of_peak"], phase["copy_gb_per_s"] * 1e9 / peak)
        if variant in ("lru", "int4"):
            assert d["prefetch_issued"] == 0 and r["prefetch"] == "none"
        else:
            assert d["prefetch_issued"] > 0 and r["prefetch"] == variant
        assert r["total_experts"] == r["layers"] * r["experts_per_layer"]
        assert r["slots"] < r["total_experts"] or variant == "int4"  # int4: may all fit a tiny shape's budget
        assert r["planned_bytes"] <= r["budget_bytes"]
        assert r["peak_device_bytes"] is None and r["within_budget"] is None  # CPU: no device memory to read
        assert r["freed"] is True  # the model was gone before the next one was built


@pytest.mark.parametrize("shape", list(SHAPES))
def test_floor_and_rates_follow_from_the_reported_numbers(
    smoke: tuple[dict[str, Any], str], shape: str
) -> None:
    result, _ = smoke
    rows = rows_of(result)
    peak = result["h2d_peak"]["bytes_per_s"]
    for variant in OURS:
        r = rows[shape, variant]
        d = r["decode"]
        assert close(r["s_per_token"], r["decode_s"] / r["decode_tokens"])
        assert close(r["decode_tok_per_s"], r["decode_tokens"] / r["decode_s"])
        assert close(r["prefill_tok_per_s"], r["prompt_tokens"] / r["prefill_s"])
        missed = d["expert_misses"] * r["expert_bytes"] / r["decode_tokens"]
        assert d["demand_missed_bytes"] == d["expert_misses"] * r["expert_bytes"]
        assert close(r["demand_missed_bytes_per_token"], missed)
        assert close(r["floor_s_per_token"], missed / peak)
        if r["floor_s_per_token"] == 0:  # no demand miss: no floor to be over
            assert r["time_over_floor"] is None
        else:
            assert close(r["time_over_floor"], r["s_per_token"] / r["floor_s_per_token"])
        assert close(r["link_floor_s_per_token"], d["bytes_host_to_device"] / r["decode_tokens"] / peak)
        assert close(r["stall_fraction"], d["stall_seconds"] / r["decode_s"])
        if r["routing"].startswith("random"):
            assert any("not representative" in note for note in r["notes"])


def test_targets_carry_their_inputs(smoke: tuple[dict[str, Any], str]) -> None:
    result, _ = smoke
    rows = rows_of(result)
    by = {(t["shape"], t["target"], t["variant"]): t for t in result["targets"]}
    # per shape: the floor for each of ours, accelerate for each but int4, lookahead's, int4's two
    assert len(by) == len(result["targets"]) == len(SHAPES) * 10
    for shape in SHAPES:
        for variant in OURS:
            r = rows[shape, variant]
            floor = by[shape, "decode time per token <= 1.2 x floor", variant]
            inputs = floor["inputs"]
            assert inputs["s_per_token"] == r["s_per_token"]
            assert inputs["floor_s_per_token"] == r["floor_s_per_token"]
            if inputs["floor_s_per_token"] == 0:
                assert floor["value"] is None and floor["status"] == "N/A"
            else:
                assert close(floor["value"], inputs["s_per_token"] / inputs["floor_s_per_token"])
                assert floor["status"] == ("PASS" if floor["value"] <= 1.2 else "FAIL")
            if variant == "int4":
                continue
            peer = by[shape, "decode tok/s >= 4 x accelerate's", variant]
            assert peer["status"] == "NOT RUN" and peer["value"] is None  # accelerate was skipped
            assert peer["inputs"]["ours_decode_tok_per_s"] == r["decode_tok_per_s"]
            assert "skipped" in peer["caveats"][0]
        look = by[shape, "lookahead demand misses <= 0.5 x LRU's", "lookahead"]
        a, b = look["inputs"]["lru_demand_misses"], look["inputs"]["lookahead_demand_misses"]
        assert a == rows[shape, "lru"]["decode"]["expert_misses"] > 0
        assert b == rows[shape, "lookahead"]["decode"]["expert_misses"]
        assert look["inputs"]["budget_bytes"] == rows[shape, "lru"]["budget_bytes"]
        assert rows[shape, "lru"]["budget_bytes"] == rows[shape, "lookahead"]["budget_bytes"]
        assert close(look["value"], b / a) and look["status"] == ("PASS" if 2 * b <= a else "FAIL")
        int4, bf16 = rows[shape, "int4"], rows[shape, "lru"]
        over = by[shape, "int4 decode tok/s >= 3 x bf16's (LRU, same budget, copy-bound)", "int4"]
        assert close(over["value"], int4["decode_tok_per_s"] / bf16["decode_tok_per_s"])
        assert over["inputs"]["bf16_stall_fraction"] == bf16["stall_fraction"]
        bound = bf16["stall_fraction"] >= 0.5
        assert over["status"] == ("PASS" if over["value"] >= 3 else "FAIL" if bound else "N/A")
        peer = by[shape, "int4 decode tok/s >= 10 x accelerate's", "int4"]
        assert peer["status"] == "NOT RUN" and peer["value"] is None
    forced_lookahead = by["olmoe-tiny", "lookahead demand misses <= 0.5 x LRU's", "lookahead"]
    assert any("random routers" in c for c in forced_lookahead["caveats"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU this would start the full benchmark")
def test_without_a_gpu_the_full_run_refuses_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from offload_bench.cli import main

    assert main(["e2e"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "offload-bench e2e: needs a CUDA GPU; --smoke checks the script on a CPU"


def run_e2e(argv: list[str], tmp_path: Any) -> tuple[dict[str, Any], str]:
    out = tmp_path / "e2e.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(BENCH), *argv, "--out", str(out)],
        capture_output=True, text=True, timeout=150, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_every_row_prints_its_estimate_and_a_time_limit_skips_what_would_not_fit(tmp_path: Any) -> None:
    """A time limit too short for any build: every row is skipped, its estimate the reason, nothing built."""
    argv = ["--smoke", "--shapes", "qwen3-30b-a3b", "--variants", "lru", "--variants", "accelerate"]
    result, stdout = run_e2e([*argv, "--time-limit", "0"], tmp_path)
    assert [r["status"] for r in result["rows"]] == ["skipped", "skipped"]
    for row in result["rows"]:
        estimate = row["estimate"]
        assert estimate["build_s"] > 0 and close(estimate["total_s"], estimate["build_s"] + estimate["run_s"])
        assert row["reason"] == f"estimated {estimate['total_s']:.0f} s, 0 s left of --time-limit"
        assert "model_bytes" not in row  # accelerate's model was never built
    assert stdout.count("estimated") >= 2 and result["host_rates_gbps"]["store_fill"] > 0


def test_estimate_only_builds_nothing_and_plans_a_gpu_run(tmp_path: Any) -> None:
    """Without a GPU, --estimate-only estimates the GPU run at real shapes from this machine's host rates."""
    argv = ["--estimate-only", "--shapes", "qwen3-30b-a3b", "--layers", "2", "--routing-trace", "none",
            "--variants", "lru", "--variants", "lookahead", "--variants", "int4", "--variants", "accelerate"]  # fmt: skip
    result, stdout = run_e2e(argv, tmp_path)
    rows = {r["variant"]: r for r in result["rows"]}
    assert {r["status"] for r in rows.values()} == {"estimated"}
    lru, look, int4 = rows["lru"]["estimate"], rows["lookahead"]["estimate"], rows["int4"]["estimate"]
    assert lru["run_s"] > look["run_s"]  # the first bf16 row pays the kernels' compile, the next does not
    assert int4["build_s"] < lru["build_s"]  # about 0.28 of the bytes to write
    assert rows["accelerate"]["estimate"]["run_s"] > 0  # estimated as on a GPU: every forward copies
    assert result["h2d_peak"]["bytes_per_s"] == 50e9 and "estimated in all" in stdout


def test_host_compute_auto_against_off_is_a_target(tmp_path: Any) -> None:
    argv = ["--smoke", "--shapes", "qwen3-30b-a3b", "--variants", "lru", "--variants", "lru-host-off"]
    result, _ = run_e2e(argv, tmp_path)
    rows = rows_of(result)
    auto, off = rows["qwen3-tiny", "lru"], rows["qwen3-tiny", "lru-host-off"]
    [target] = [t for t in result["targets"] if t["target"].startswith("decode tok/s with host compute auto")]
    assert close(target["value"], auto["decode_tok_per_s"] / off["decode_tok_per_s"])
    assert target["status"] == ("PASS" if target["value"] >= 0.95 else "FAIL")
    assert (
        off["host_compute"] == "off" and target["inputs"]["off_decode_tok_per_s"] == off["decode_tok_per_s"]
    )
    assert auto["wall_s"] > 0 and auto["estimate"]["total_s"] > 0  # what it took, beside what was estimated
