"""--config for offload-run, offload-serve and offload-bench sweep: presets apply, the command line wins,
every bad preset is one line naming the key (exit code 2); every file in configs/ is valid for its command,
and the model presets' stated plans are what the planner computes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from offload.cli import run, serve
from offload.cli.serve import main as serve_main
from offload_bench.cli import main as bench_main
from tests.helpers import ROOT

CONFIGS = ROOT / "configs"
MODEL_PRESETS = sorted(CONFIGS.glob("*.toml"))
CARD_PRESETS = [p for p in MODEL_PRESETS if not p.stem.endswith("-ram")]  # every expert in host RAM
DISK_PRESETS = [p for p in MODEL_PRESETS if p.stem.endswith("-ram")]  # larger than the machine's RAM
SWEEP_GRIDS = sorted((CONFIGS / "sweeps").glob("*.toml"))


def write(tmp_path: Path, text: str, name: str = "preset.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_run_and_serve_share_every_model_option() -> None:
    """One definition (offload.cli.options): same flags, defaults, types and choices."""

    def options(parser) -> dict[str, tuple]:
        return {
            a.option_strings[-1]: (a.dest, a.default, a.type, a.choices)
            for a in parser._actions
            if a.option_strings
        }

    ran, served = options(run.build_parser()), options(serve.build_parser())
    only_run = set(ran) - set(served)
    assert only_run == {"--prompt"}  # a server takes its prompts from requests
    assert {k: v for k, v in ran.items() if k != "--prompt"} == {k: served[k] for k in ran if k != "--prompt"}
    assert set(served) - set(ran) == {
        "--host",
        "--port",
        "--api-key",
        "--queue-size",
        "--served-model-name",
        "--log-level",
    }


def test_preset_values_and_command_line_precedence(tmp_path: Path) -> None:
    preset = write(
        tmp_path, 'vram-budget = "12GB"\nmax-context = 2048\npolicy = "lfru"\nport = 9000\nqueue-size = 2\n'
    )
    args = serve.build_parser().parse_args(["--config", str(preset), "--policy", "lru", "--port", "9100"])
    assert (args.vram_budget, args.max_context, args.policy, args.port, args.queue_size) == (
        "12GB",
        2048,
        "lru",
        9100,
        2,
    )
    assert args.host == "127.0.0.1" and args.seed == 0  # untouched defaults
    assert args.prefetch == "auto"  # resolved once the model is known (offload.hf.prefetch)
    with pytest.raises(run.UsageError, match="unknown key 'port'"):  # offload-run has no --port
        run.build_parser().parse_args(["--config", str(preset)])


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("vram-budget = 12\n", ["key 'vram-budget' must be a string", "12 (an integer)"]),
        ('max-context = "4096"\n', ["key 'max-context' must be an integer"]),
        ('temperature = "hot"\n', ["key 'temperature' must be a number"]),
        (
            'prefetch = "sometimes"\n',
            ["key 'prefetch' must be one of auto, none, history, lookahead, pre-attention"],
        ),
        ('vram_budget = "12GB"\n', ["unknown key 'vram_budget'", "did you mean 'vram-budget'"]),
        ('kv-cache-dtype = "fp8"\n', ["unknown key 'kv-cache-dtype'"]),
        ("[serve]\nport = 1\n", ["key 'serve' is a table"]),
        ('vram-budget = "12GB\n', ["not valid TOML"]),
    ],
)
@pytest.mark.parametrize("command", ["offload-run", "offload-serve"])
def test_bad_preset_is_one_line_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, text: str, needles: list[str]
) -> None:
    main = run.main if command == "offload-run" else serve_main
    preset = write(tmp_path, text)
    assert main(["--config", str(preset)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"{command}: error: --config {preset}: ")
    for needle in needles:
        assert needle in err


def test_missing_preset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run.main(["--config", str(tmp_path / "nope.toml")]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"offload-run: error: --config {tmp_path / 'nope.toml'}: no such file"
    )


def test_offload_run_from_a_preset(
    cli_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A whole run described by a preset, one option overridden on the command line."""
    from tests.offload.cli.test_run import budget_for

    stats = tmp_path / "stats.json"
    preset = write(
        tmp_path,
        f'model = "{cli_checkpoint}"\nvram-budget = "{budget_for(cli_checkpoint, 6, 128)}"\ndevice = "cpu"\n'
        f'max-context = 128\nmax-new-tokens = 3\nprompt = "hello"\nstats-json = "{stats}"\n',
    )
    capsys.readouterr()
    assert run.main(["--config", str(preset), "--max-new-tokens", "5"]) == 0, capsys.readouterr().err
    result = json.loads(stats.read_text())
    assert (result["new_tokens"], result["prompt_tokens"], result["slots"]) == (5, 5, 6)


def test_sweep_from_a_grid_with_overrides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The committed prefetch grid, cut down on the command line, reproduces its committed rows."""
    out = tmp_path / "sweep"
    argv = ["sweep", "--config", str(CONFIGS / "sweeps" / "olmoe-prefetch.toml"), "--out", str(out)]
    assert bench_main([*argv, "--policies", "lru,lfru", "--cache-fractions", "0.25", "--scope", "layer"]) == 0
    got = list(csv.DictReader((out / "sweep.csv").open()))
    committed = {
        (r["policy"], r["scope"], r["cache_fraction"], r["prefetch"]): r
        for r in csv.DictReader((ROOT / "bench/results/sweep-prefetch-olmoe/sweep.csv").open())
    }
    assert len(got) == 5  # lru and lfru with and without history prefetch, belady without
    for row in got:
        want = committed[(row["policy"], row["scope"], row["cache_fraction"], row["prefetch"])]
        # the committed CSV predates the host-compute columns; without --host-gbps they say off
        assert {k: row[k] for k in want} == want
        assert (row["host"], row["host_computed"]) == ("off", "0")
    assert all(row["tokens_per_s"] for row in got)  # copy-gbps and layer-compute-ms came from the grid


def test_bad_sweep_grid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    grid = write(tmp_path, 'trace = ["x.jsonl"]\nout = "o"\ncache-fractions = [0.25]\n')
    with pytest.raises(SystemExit) as exit:
        bench_main(["sweep", "--config", str(grid)])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert (
        err.strip()
        == f"offload-bench sweep: error: --config {grid}: key 'cache-fractions' must be a string, got [0.25] (an array)"
    )


@pytest.mark.parametrize("grid", SWEEP_GRIDS, ids=lambda p: p.name)
def test_sweep_grids_are_valid(grid: Path) -> None:
    from cache_policies.study.sweep import OneLineParser, add_arguments

    parser = OneLineParser(prog="sweep")
    add_arguments(parser)
    args = parser.parse_args(["--config", str(grid)])
    assert args.trace and all((ROOT / t).is_file() for t in args.trace)
    assert args.out


@pytest.mark.parametrize("preset", MODEL_PRESETS, ids=lambda p: p.name)
def test_model_presets_are_valid_for_both_commands(preset: Path) -> None:
    served = serve.build_parser().parse_args(["--config", str(preset)])
    ran = run.build_parser().parse_args(["--config", str(preset)])
    assert served.model == ran.model and served.model.count("/") == 1  # a hub id
    assert served.vram_budget.endswith("GiB") and served.dtype == "bf16"
    assert "Host RAM:" in preset.read_text() and "Policy:" in preset.read_text()


def test_every_card_and_model_has_a_preset() -> None:
    names = {p.stem for p in CARD_PRESETS}
    models = (
        "mixtral-8x7b",
        "qwen3-30b-a3b",
        "gpt-oss-20b",
        "gpt-oss-120b",
        "deepseek-v2-lite",
        "olmoe-1b-7b",
    )
    assert names == {f"{m}-{card}gb" for m in models for card in (12, 16, 24)}


@pytest.mark.slow
def test_model_presets_state_what_the_planner_computes() -> None:
    """Each preset's "# Plan: N of M expert slots" and host RAM against the runtime's planner on the
    checkpoint's shape, in the format the preset loads."""
    from offload_bench.preset_sizing import plan_preset, stated_plan

    for preset in CARD_PRESETS:
        plan = plan_preset(preset)
        assert stated_plan(preset) == (plan["slots"], plan["total_experts"]), preset.name
        slots_per_layer = plan["slots"] / plan["layers"]
        if plan["cache_scope"] == "layer":
            assert slots_per_layer >= plan["top_k"], preset.name
        text = preset.read_text()
        assert f"{plan['host_store_bytes'] / 1e9:.1f} GB of pinned expert store" in text, preset.name
        assert f"in {plan['expert_format']})" in text, preset.name  # the store's format, as planned
        assert f"{plan['host_ram_bytes'] / 1e9:.1f} GB in all" in text, preset.name
        assert json.dumps(plan)  # plain numbers


@pytest.mark.slow
def test_disk_presets_state_what_the_planner_computes() -> None:
    """The presets for models larger than the machine's RAM (issue 25): gpt-oss-120b and two larger models, on
    12-24 GB cards with 32 and 64 GB of RAM; each keeps its experts on disk under the host slots the runtime's
    host plan gives at its limit, and says the disk bytes per token and the NVMe rate for 5 tokens/s."""
    from offload_bench.preset_sizing import plan_preset, stated_plan

    assert {p.stem.split("-")[0] for p in DISK_PRESETS} >= {"gpt", "glm", "qwen3"}
    assert {p.stem.rsplit("-", 2)[1] for p in DISK_PRESETS} == {"32gb", "64gb"}
    for preset in DISK_PRESETS:
        plan = plan_preset(preset)  # asserts that every expert would not fit the limit, and the tier's does
        text = preset.read_text()
        assert stated_plan(preset) == (plan["slots"], plan["total_experts"]), preset.name
        assert f"under {plan['host_tier_slots']} of {plan['total_experts']} experts" in text, preset.name
        assert f"{plan['disk_bytes_per_token'] / 1e9:.2f} GB: {plan['nvme_gbps_for_target']:.1f} GB/s" in text
        assert f"host-memory-limit {plan['host_memory_limit']}" in text and "Host RAM:" in text
