"""The load test end to end on a tiny model: it starts its own server, stays bounded, and reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers

from offload_bench.serve_load import main
from tests.byte_tokenizer import byte_tokenizer
from tests.conftest import save_tiny


def test_load_test_reports_latency_and_tokens_per_second(tmp_path: Path) -> None:
    tokenizer = byte_tokenizer()
    config = transformers.MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
    )
    save_tiny(config, tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "load.json"
    server = (
        f"--model {tmp_path / 'model'} --vram-budget 1GB --device cpu --max-context 256 --log-level warning"
    )
    argv = [
        "--server-args",
        server,
        "--clients",
        "3",
        "--requests",
        "5",
        "--max-tokens",
        "4",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["requests"] == {"ok": 5, "refused_429": 0, "failed": 0}
    assert 0 < result["completion_tokens"] <= 20 and result["tokens_per_s"] > 0
    assert 0 < result["ttft_s"]["p50"] <= result["latency_s"]["p50"] <= result["latency_s"]["p99"]
    assert result["server_metrics"]["offload_completion_tokens_total"] == result["completion_tokens"]
    assert result["command"].startswith("python bench/serve_load.py --server-args")


def test_only_loopback_urls(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["--url", "http://example.com:8000"])
    assert exit.value.code == 2
    assert "loopback" in capsys.readouterr().err
