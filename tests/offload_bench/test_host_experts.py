"""The host benchmark's conversion table (bench/int4pack_conversion.py): its rows, on the tiny shape."""

from __future__ import annotations

from offload_bench import host_experts as hx


def test_conversion_table_times_both_layouts_per_format_and_thread_count() -> None:
    rows = hx.conversion_table({"tiny": (64, 96), "OLMoE-1B-7B": (64, 96)}, repeats=1, torch_threads=[1, 2])
    assert [(r["shape"], r["format"], r["torch_threads"]) for r in rows] == [
        (shape, fmt, threads)
        for shape in ("tiny", "OLMoE-1B-7B")
        for fmt in ("int4", "mxfp4")
        for threads in (1, 2)
    ]
    for r in rows:
        assert r["ms_per_expert"] > 0 and r["torch_converter_ms_per_expert"] > 0
        assert r["speedup"] == r["torch_converter_ms_per_expert"] / r["ms_per_expert"]
    olmoe = rows[-1]  # a model's shape (here shrunk) projects over its every expert
    assert olmoe["model_experts"] == 16 * 64
    assert olmoe["model_seconds"] == olmoe["model_experts"] * olmoe["ms_per_expert"] / 1e3
    assert rows[0]["model_experts"] is None and rows[0]["model_seconds"] is None
