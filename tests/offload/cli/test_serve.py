"""offload-serve's command line: bad options, a busy port and a model that cannot load are one line and exit
code 2, before any request; SIGTERM stops it cleanly and writes --stats-json."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import httpx
import pytest

from offload.cli.serve import build_parser, main
from offload_bench.serve_process import ServerProcess
from tests.offload.cli.test_run import budget_for


def serve(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


def assert_usage_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    assert lines[0].startswith("offload-serve: error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


def test_defaults_listen_on_loopback_only() -> None:
    args = build_parser().parse_args([])
    assert (args.host, args.port, args.api_key, args.queue_size) == ("127.0.0.1", 8000, None, 16)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--port", "70000"], "--port must be 0..65535"),
        (["--queue-size", "-1"], "--queue-size must be 0 or more"),
        (["--port", "eighty"], "--port"),
        (["--vram-budget", "lots"], "--vram-budget"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--temperature", "-1"], "--temperature"),
        (["--policy", "nonsense"], "unknown policy"),
        (["--log-level", "loud"], "--log-level"),
        (["--frobnicate"], "unrecognized arguments"),
    ],
)
def test_bad_options(
    cli_checkpoint: Path, capsys: pytest.CaptureFixture[str], extra: list[str], needle: str
) -> None:
    code, err = serve(["--model", str(cli_checkpoint), "--vram-budget", "1GB", "--port", "0", *extra], capsys)
    assert_usage_error(code, err, needle)


def test_model_required_budget(cli_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert_usage_error(*serve(["--model", str(cli_checkpoint)], capsys), "--vram-budget is required")


def test_models_that_cannot_load(
    cli_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--vram-budget", "1GB", "--device", "cpu", "--port", "0"]
    assert_usage_error(*serve(["--model", str(tmp_path / "nope"), *base], capsys), "does not exist")
    broken = shutil.copytree(cli_checkpoint, tmp_path / "truncated")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_usage_error(*serve(["--model", str(broken), *base], capsys), "truncated or corrupt")
    assert_usage_error(
        *serve(
            ["--model", str(cli_checkpoint), "--vram-budget", "10kB", "--device", "cpu", "--port", "0"],
            capsys,
        ),
        "too small",
    )


def test_busy_port(cli_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        code, err = serve(
            ["--model", str(cli_checkpoint), "--vram-budget", "1GB", "--port", str(port)], capsys
        )
    assert_usage_error(code, err, f"cannot listen on 127.0.0.1:{port}")


def test_list_architectures(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--list-architectures"]) == 0
    assert "mixtral" in capsys.readouterr().out


def test_sigterm_stops_cleanly_and_writes_stats(cli_checkpoint: Path, tmp_path: Path) -> None:
    stats = tmp_path / "stats.json"
    args = ["--model", str(cli_checkpoint), "--vram-budget", budget_for(cli_checkpoint, 6, 128)]
    args += [
        "--device",
        "cpu",
        "--max-context",
        "128",
        "--stats-json",
        str(stats),
        "--record-trace",
        str(tmp_path / "t.npz"),
    ]
    server = ServerProcess(args, tmp_path / "server.log")
    try:
        body = {"model": str(cli_checkpoint), "prompt": "hello", "max_tokens": 3}
        assert (
            httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["usage"][
                "completion_tokens"
            ]
            == 3
        )
    finally:
        code = server.stop()
    assert code == 0, server.tail()
    result = json.loads(stats.read_text())
    assert result["requests_completed"] == 1 and result["completion_tokens"] == 3
    assert result["expert_uses"] > 0 and result["slots"] == 6
    assert (tmp_path / "t.npz").is_file()
