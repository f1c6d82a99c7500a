"""The CPU formats benchmark (bench/cpu_formats.py) at tiny widths: every variant at one budget, its rows."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from offload_bench import cpu_formats

TRACE = Path(__file__).resolve().parents[2] / "data" / "traces" / "olmoe-1b-7b_decode_299.jsonl"


def test_every_variant_runs_at_the_same_budget() -> None:
    args = SimpleNamespace(
        smoke=True,
        layers=2,
        vram_budget="67.7MB",
        max_context=64,
        prompt_tokens=16,
        warmup_tokens=1,
        decode_tokens=2,
        variants=",".join(cpu_formats.VARIANTS),
        trace=TRACE,
    )
    result = cpu_formats.run(args)
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == list(cpu_formats.VARIANTS) and result["layers"] == 2
    assert rows["int4"]["packing"] == "int4pack" and rows["int4-reference"]["packing"] == "canonical"
    assert rows["int4-reference"]["kernels"] == "torch"
    assert rows["int4"]["kernels"].endswith("on int4pack slots")
    # one budget: the int4pack packing has fewer fields to align than the canonical int4 layout, so no fewer
    # slots (tiny widths: the workspace of a compressed model, which reads an expert back, is what shows here)
    assert rows["int4"]["expert_bytes"] <= rows["int4-reference"]["expert_bytes"]
    assert rows["int4"]["slots"] >= rows["int4-reference"]["slots"] > 0
    for r in rows.values():
        assert r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0
        assert 0 <= r["decode_hit_rate"] <= 1 and r["decode_vs_bf16"] > 0
    assert rows["bf16"]["decode_vs_bf16"] == 1.0
