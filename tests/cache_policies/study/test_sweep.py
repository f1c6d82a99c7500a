"""``offload-bench sweep`` end to end in a temporary directory, and every bad-input path (exit code 2)."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np
import pytest

from cache_policies import AccessSequence, RoutingTrace, TimingModel, simulate
from cache_policies.study.sweep import main as sweep_main
from tests.helpers import TRACES

OLMOE = TRACES / "olmoe-1b-7b_decode_299.jsonl"
ALL = ["lru", "lfu", "fifo", "random", "lfru", "static", "belady"]


def run(
    argv: list[str], capsys: pytest.CaptureFixture[str], *, via_bench: bool = False
) -> tuple[int, str, str]:
    """Exit code, stdout, stderr of one command; argparse's own errors exit through SystemExit."""
    try:
        if via_bench:
            from offload_bench.cli import main as bench_main

            code = bench_main(argv)
        else:
            code = sweep_main(argv)
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def traces(tmp_path: Path) -> list[Path]:
    """A native trace (2 layers, 8 experts, top-2) and a JSONL one (3 layers, 8 experts, top-3)."""
    rng = random.Random(0)
    ids = np.array([[rng.sample(range(8), 2) for _ in range(2)] for _ in range(80)])
    native = RoutingTrace(ids, np.arange(81), 8, model="tiny-a").save(tmp_path / "tiny-a.npz")
    jsonl = tmp_path / "tiny-b.jsonl"
    lines = [f'{{"layers": {[sorted(rng.sample(range(8), 3)) for _ in range(3)]}}}' for _ in range(60)]
    jsonl.write_text("\n".join(lines) + "\n")
    return [native, jsonl]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_sweep_end_to_end(tmp_path: Path, traces: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    argv = ["--trace", str(traces[0]), "--trace", str(traces[1]), "--out", str(out)]
    argv += ["--policies", ",".join(ALL), "--cache-fractions", "0.25,0.5", "--scope", "both"]
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["sweep.csv", "sweep.md", "sweep.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "out",
        "tiny-a.npz",
        "tiny-b.jsonl",
    ]  # no temp dir left
    rows = read_csv(out / "sweep.csv")
    assert len(rows) == 2 * 2 * 2 * len(ALL)
    for column in ("trace", "policy", "scope", "cache_fraction", "slots", "accesses", "hits", "hit_rate"):
        assert column in rows[0]
    layers = {"tiny-a": 2, "tiny-b": 3}
    for row in rows:
        per_layer = {"0.25": 2, "0.5": 4}[row["cache_fraction"]]  # round(fraction x 8 experts)
        assert int(row["slots"]) == (
            per_layer if row["scope"] == "layer" else per_layer * layers[row["trace"]]
        )
        assert float(row["hit_rate"]) == pytest.approx(int(row["hits"]) / int(row["accesses"]), abs=1e-6)
        bound = next(
            r
            for r in rows
            if r["policy"] == "belady"
            and (r["trace"], r["scope"], r["cache_fraction"])
            == (row["trace"], row["scope"], row["cache_fraction"])
        )
        assert row["belady_hit_rate"] == bound["hit_rate"]
        assert int(row["hits"]) <= int(bound["hits"])
        assert float(row["share_of_belady"]) == pytest.approx(
            float(row["hit_rate"]) / float(bound["hit_rate"]), abs=1e-5
        )
    # the csv agrees with the simulator called directly
    seq = AccessSequence.from_trace(RoutingTrace(*_arrays(traces[0]), 8))
    direct = simulate(seq, "lfu", 2 * 2, "global")
    row = next(
        r
        for r in rows
        if (r["trace"], r["policy"], r["scope"], r["cache_fraction"]) == ("tiny-a", "lfu", "global", "0.25")
    )
    assert int(row["hits"]) == direct.hits and int(row["accesses"]) == direct.accesses == 80 * 2 * 2
    md = (out / "sweep.md").read_text()
    assert "## tiny-a" in md and "## tiny-b" in md and "%)" in md
    assert md.count("| layer | 0.25 |") == 2 and md.count("| global | 0.5 |") == 2
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "sweep.csv" in stdout
    # without --prefetch: demand paging only, and the md says so
    assert {r["prefetch"] for r in rows} == {"none"} and {r["history_window"] for r in rows} == {""}
    assert {r["prefetch_issued"] for r in rows} == {"0"} and "+history" not in md and "no prefetch" in md


def _arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return z["ids"], z["step_offsets"]


def test_belady_is_always_run(tmp_path: Path, traces: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code, _, _ = run(
        ["--trace", str(traces[0]), "--policies", "lru", "--scope", "layer", "--out", str(out)], capsys
    )
    assert code == 0
    rows = read_csv(out / "sweep.csv")
    assert sorted({r["policy"] for r in rows}) == ["belady", "lru"]
    assert sorted({r["cache_fraction"] for r in rows}) == ["0.125", "0.25", "0.5"]  # the default fractions
    assert {r["scope"] for r in rows} == {"layer"}


def test_sweep_reproduces_the_reference_on_a_shared_trace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--trace", str(OLMOE), "--policies", "lru,fifo", "--cache-fractions", "0.25"]
    code, _, err = run([*argv, "--scope", "layer", "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err
    line = next(
        ln
        for ln in (TRACES / "reference_hit_rates.txt").read_text().splitlines()
        if ln.startswith("layer") and "frac=0.25 " in ln
    )  # the first match is the olmoe block
    expected = dict(item.split("=") for item in line.split()[3:])
    got = {r["policy"]: r for r in read_csv(tmp_path / "o" / "sweep.csv")}
    for policy in ("lru", "fifo", "belady"):
        assert f"{float(got[policy]['hit_rate']):.3f}" == expected[policy]
    assert got["lru"]["slots"] == "16"


def test_static_profile_from_another_trace(
    tmp_path: Path, traces: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--trace", str(traces[0]), "--policies", "static", "--cache-fractions", "0.5", "--scope", "layer"]
    code, _, _ = run([*argv, "--out", str(tmp_path / "self")], capsys)
    assert code == 0
    code, _, _ = run([*argv, "--static-profile", str(traces[0]), "--out", str(tmp_path / "same")], capsys)
    assert code == 0
    assert read_csv(tmp_path / "self" / "sweep.csv") == read_csv(tmp_path / "same" / "sweep.csv")
    code, _, err = run([*argv, "--static-profile", str(traces[1]), "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "--static-profile has 3 layers" in err


def test_timing_columns(tmp_path: Path, traces: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    argv = ["--trace", str(traces[0]), "--policies", "lru", "--scope", "layer", "--cache-fractions", "0.25"]
    argv += ["--expert-bytes", "5000000", "--copy-gbps", "10", "--layer-compute-ms", "2", "--out", str(out)]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    for row in read_csv(out / "sweep.csv"):
        misses = int(row["misses"])
        copy_s = misses * 5e6 / 10e9  # 0.5 ms per miss
        total_s = 80 * 2 * 2e-3 + copy_s  # 80 steps x 2 layers x 2 ms, plus the copies
        assert int(row["bytes_moved"]) == misses * 5_000_000
        assert float(row["tokens_per_s"]) == pytest.approx(80 / total_s, rel=1e-3)
        assert float(row["stall_fraction"]) == pytest.approx(copy_s / total_s, abs=1e-4)


@pytest.mark.parametrize(("fmt", "per_weight"), [("int4", 0.5625), ("mxfp4", 0.53125), ("int8", 1.0)])
def test_format_counts_compressed_expert_bytes(
    fmt: str, per_weight: float, tmp_path: Path, traces: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """--format: bytes moved and simulated time count the expert in that format, hits unchanged."""
    argv = ["--trace", str(traces[0]), "--policies", "lru", "--scope", "layer", "--cache-fractions", "0.25"]
    argv += ["--expert-bytes", "4000000", "--copy-gbps", "10", "--layer-compute-ms", "2"]
    code, _, err = run([*argv, "--out", str(tmp_path / "bf16")], capsys)
    assert code == 0, err
    code, _, err = run([*argv, "--format", fmt, "--out", str(tmp_path / fmt)], capsys)
    assert code == 0, err
    full, packed = read_csv(tmp_path / "bf16" / "sweep.csv"), read_csv(tmp_path / fmt / "sweep.csv")
    assert len(full) == len(packed)
    for a, b in zip(full, packed, strict=True):
        assert b["trace"] == f"{a['trace']}-{fmt}"
        assert a["misses"] == b["misses"]
        assert int(b["bytes_moved"]) == int(a["misses"]) * round(2_000_000 * per_weight)
        assert float(b["tokens_per_s"]) >= float(a["tokens_per_s"])


def test_prefetch_modes(tmp_path: Path, traces: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    argv = ["--trace", str(traces[0]), "--trace", str(traces[1]), "--policies", "lru,fifo,belady"]
    argv += ["--cache-fractions", "0.25,0.5", "--prefetch", "none,history", "--history-window", "4"]
    code, _, err = run([*argv, "--expert-bytes", "1000", "--out", str(out)], capsys)
    assert code == 0, err
    rows = read_csv(out / "sweep.csv")
    labels = [(r["policy"], r["prefetch"]) for r in rows]
    # per (trace, scope, fraction): each policy without, then with prefetch; Belady once, never prefetching
    assert labels[:5] == [
        ("lru", "none"),
        ("fifo", "none"),
        ("belady", "none"),
        ("lru", "history"),
        ("fifo", "history"),
    ]
    assert len(rows) == 2 * 2 * 2 * 5
    seqs = {t.stem: AccessSequence.from_trace(_load(t)) for t in traces}
    for row in rows:
        issued, used, wasted = (int(row[c]) for c in ("prefetch_issued", "prefetch_hits", "prefetch_wasted"))
        assert int(row["hits"]) + int(row["misses"]) == int(row["accesses"])  # prefetch never changes that
        assert used + wasted <= issued
        assert int(row["bytes_moved"]) == (int(row["misses"]) + issued) * 1000
        if row["prefetch"] == "none":
            assert issued == 0 and row["history_window"] == ""
            continue
        assert row["history_window"] == "4" and row["policy"] != "belady"
        direct = simulate(
            seqs[row["trace"]],
            row["policy"],
            int(row["slots"]),
            row["scope"],  # type: ignore[arg-type]
            prefetch="history",
            history_window=4,
        )
        assert (int(row["hits"]), issued, used, wasted) == (
            direct.hits,
            direct.prefetch_issued,
            direct.prefetch_hits,
            direct.prefetch_wasted,
        )
    assert any(int(r["prefetch_hits"]) > 0 for r in rows) and any(int(r["prefetch_wasted"]) > 0 for r in rows)
    md = (out / "sweep.md").read_text()
    assert "| belady | lru | fifo | lru+history | fifo+history |" in md
    assert "demand-paging bound" in md and "can exceed it" in md and "last 4 accesses" in md
    assert md.count("| prefetches/token |") == 2  # a prefetch table per trace
    assert md.count("| layer | 0.25 | lru | history |") == 2


def _load(path: Path) -> RoutingTrace:
    from cache_policies import load_trace

    return load_trace(path)


def test_prefetch_timing_columns(
    tmp_path: Path, traces: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = ["--trace", str(traces[0]), "--policies", "lru", "--scope", "global", "--cache-fractions", "0.25"]
    argv += [
        "--prefetch",
        "history",
        "--expert-bytes",
        "5000000",
        "--copy-gbps",
        "10",
        "--layer-compute-ms",
        "2",
    ]
    code, _, err = run([*argv, "--out", str(out)], capsys)
    assert code == 0, err
    rows = {(r["policy"], r["prefetch"]): r for r in read_csv(out / "sweep.csv")}
    assert sorted(rows) == [("belady", "none"), ("lru", "history")]  # --prefetch history alone: Belady still
    row = rows["lru", "history"]
    direct = simulate(
        _load(traces[0]),
        "lru",
        4,
        "global",
        prefetch="history",
        timing=TimingModel(10.0, 2e-3),
        expert_bytes=5_000_000,
    )
    assert float(row["tokens_per_s"]) == pytest.approx(direct.tokens_per_s, rel=1e-3)
    assert float(row["stall_fraction"]) == pytest.approx(direct.stall_fraction, abs=1e-4)
    assert int(row["prefetch_late"]) == direct.prefetch_late
    assert rows["belady", "none"]["prefetch_late"] == ""
    md = (out / "sweep.md").read_text()
    assert "| tokens/s | with prefetch | stall | with prefetch |" in md


def test_existing_out_dir_keeps_other_files(
    tmp_path: Path, traces: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "sweep.csv").write_text("old")
    code, _, _ = run(["--trace", str(traces[0]), "--policies", "fifo", "--out", str(out)], capsys)
    assert code == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "sweep.csv").read_text() != "old"


BAD_INPUT = {
    "missing trace": (["--trace", "{tmp}/nope.npz"], "no such trace file"),
    "malformed trace": (["--trace", "{tmp}/garbage.jsonl"], "not valid JSON"),
    "unknown policy": (["--trace", "{a}", "--policies", "lru,mru"], "unknown policy 'mru'"),
    "zero fraction": (["--trace", "{a}", "--cache-fractions", "0"], "must be in (0, 1]"),
    "fraction above one": (["--trace", "{a}", "--cache-fractions", "0.25,1.5"], "must be in (0, 1]"),
    "fraction not a number": (["--trace", "{a}", "--cache-fractions", "abc"], "'abc' is not a number"),
    "fraction without slots": (["--trace", "{a}", "--cache-fractions", "0.01"], "gives no slot"),
    "bad scope": (["--trace", "{a}", "--scope", "both-ish"], "invalid choice"),
    "no trace": ([], "--trace"),
    "bad half-life": (["--trace", "{a}", "--lfru-half-life", "-3"], "--lfru-half-life"),
    "half a timing model": (["--trace", "{a}", "--copy-gbps", "25"], "needs both --copy-gbps and"),
    "timing without expert size": (
        ["--trace", "{a}", "--copy-gbps", "25", "--layer-compute-ms", "1"],
        "pass --expert-bytes",
    ),
    "zero bandwidth": (
        ["--trace", "{a}", "--copy-gbps", "0", "--layer-compute-ms", "1", "--expert-bytes", "8"],
        "bandwidth",
    ),
    "bad expert size": (["--trace", "{a}", "--expert-bytes", "0"], "--expert-bytes must be positive"),
    "lookahead prefetch": (["--trace", "{a}", "--prefetch", "none,lookahead"], "only in the runtime"),
    "unknown prefetch": (["--trace", "{a}", "--prefetch", "none,magic"], "unknown prefetch mode 'magic'"),
    "empty prefetch": (["--trace", "{a}", "--prefetch", ","], "--prefetch is empty"),
    "zero history window": (
        ["--trace", "{a}", "--prefetch", "history", "--history-window", "0"],
        "--history-window must be at least 1",
    ),
    "history window not a number": (["--trace", "{a}", "--history-window", "x"], "invalid int value"),
    "zero host fraction": (["--trace", "{a}", "--host-fractions", "0.5,0"], "--host-fractions: 0.0 must be"),
    "host fraction without slots": (["--trace", "{a}", "--host-fractions", "0.01"], "gives no slot"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_and_exit_code_2(
    case: str, tmp_path: Path, traces: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "garbage.jsonl").write_text("{not json\n")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "sweep.csv").write_text("old results")
    args, message = BAD_INPUT[case]
    args = [a.format(tmp=tmp_path, a=traces[0]) for a in args]
    for out in (tmp_path / "new", existing):
        code, stdout, err = run([*args, "--out", str(out)], capsys)
        assert code == 2
        assert message in err
        assert len(err.strip().splitlines()) == 1 and err.startswith("offload-bench sweep: error:")
        assert "Traceback" not in err and stdout == ""
        assert not (tmp_path / "new").exists()  # nothing written
        assert (existing / "sweep.csv").read_text() == "old results" and len(list(existing.iterdir())) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "existing",
        "garbage.jsonl",
        "tiny-a.npz",
        "tiny-b.jsonl",
    ]


def test_out_that_is_a_file(tmp_path: Path, traces: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    code, _, err = run(["--trace", str(traces[0]), "--out", str(target)], capsys)
    assert code == 2 and "is not a directory" in err and target.read_text() == "x"


def test_missing_out_argument(traces: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["--trace", str(traces[0])], capsys)
    assert code == 2 and "--out" in err and len(err.strip().splitlines()) == 1


def test_through_offload_bench(
    tmp_path: Path, traces: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = ["sweep", "--trace", str(traces[1]), "--policies", "lru", "--scope", "global", "--out", str(out)]
    code, _, err = run(argv, capsys, via_bench=True)
    assert code == 0, err
    assert {r["scope"] for r in read_csv(out / "sweep.csv")} == {"global"}
    code, _, err = run(
        ["sweep", "--trace", str(traces[1]), "--policies", "x", "--out", str(out)], capsys, via_bench=True
    )
    assert code == 2 and err.startswith("offload-bench sweep: error: unknown policy 'x'")
    code, _, err = run(["nonsense"], capsys, via_bench=True)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "invalid choice" in err
    code, _, err = run([], capsys, via_bench=True)
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_sweep_without_matplotlib_writes_the_numbers_and_says_so(
    tmp_path: Path, traces: list[Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """matplotlib is an optional extra: without it the CSV and the tables are written, and the run says so."""
    import sys

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib...` raises ImportError
    out = tmp_path / "out"
    code, stdout, err = run(["--trace", str(traces[0]), "--policies", "lru", "--out", str(out)], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["sweep.csv", "sweep.md"]
    assert "sweep.png not drawn: matplotlib is not installed" in stdout


def test_host_fractions_add_a_ram_tier_with_its_belady_figure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every online policy over a RAM tier too: the CSV's two-tier columns (empty for single-tier rows), a
    table of its own in sweep.md, and a Belady RAM tier that never reads more than the policy's."""
    out = tmp_path / "out"
    argv = ["--trace", str(OLMOE), "--policies", "lru,lfu", "--cache-fractions", "0.125,0.25"]
    argv += [
        "--scope",
        "both",
        "--host-fractions",
        "0.25,0.5",
        "--expert-bytes",
        "12582000",
        "--out",
        str(out),
    ]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    rows = read_csv(out / "sweep.csv")
    single = [r for r in rows if not r["host_fraction"]]
    tiered = [r for r in rows if r["host_fraction"]]
    assert len(single) == 2 * 2 * 3 and len(tiered) == 2 * 2 * 2 * 2  # scopes x fractions x (policies, RAM)
    assert all(r["disk_reads"] == r["belady_disk_reads"] == "" for r in single)
    for r in tiered:
        assert r["policy"] in ("lru", "lfu")
        assert 0 < int(r["belady_disk_reads"]) <= int(r["disk_reads"])
        assert int(r["disk_bytes"]) == int(r["disk_reads"]) * 12582912  # each read a whole 4 KiB-aligned row
        twin = next(
            s
            for s in single
            if (s["policy"], s["scope"], s["cache_fraction"])
            == (r["policy"], r["scope"], r["cache_fraction"])
        )
        assert r["misses"] == twin["misses"]  # the device tier's decisions do not depend on the RAM tier
    more = {
        (r["policy"], r["scope"], r["cache_fraction"]): int(r["disk_reads"])
        for r in tiered
        if r["host_fraction"] == "0.5"
    }
    less = {
        (r["policy"], r["scope"], r["cache_fraction"]): int(r["disk_reads"])
        for r in tiered
        if r["host_fraction"] == "0.25"
    }
    assert all(more[key] <= less[key] for key in more)  # more RAM, fewer reads
    md = (out / "sweep.md").read_text()
    assert "Two tiers (`--host-fractions`)" in md and "| layer | 0.25 | 0.5 | lru |" in md
