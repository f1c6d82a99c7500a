"""The streamed-prefill benchmark (bench/prefill_stream.py) at tiny widths: both modes run the same plan."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from offload_bench import prefill_stream

TRACE = Path(__file__).resolve().parents[2] / "data" / "traces" / "olmoe-1b-7b_decode_299.jsonl"


def test_both_modes_copy_the_same_bytes() -> None:
    args = SimpleNamespace(
        smoke=True,
        layers=2,
        vram_budget="67345488",  # the minimum and 4 slots: each prefill chunk's layer call runs in waves
        max_context=128,
        prompt_tokens=64,
        prefill_chunk=32,
        repeats=1,
        trace=TRACE,
    )
    result = prefill_stream.run(args)
    modes = result["modes"]
    assert modes["wave-at-a-time"]["stream_groups"] == 1 and modes["streamed"]["stream_groups"] > 1
    assert result["same_bytes"] and modes["streamed"]["bytes_per_prefill_token"] > 0
    assert modes["streamed"]["waves_per_layer_call"] > 1 and result["prefill_chunk"] == 32
    assert result["speedup"] > 0 and result["speedup_next_layer"] > 0
    assert modes["streamed+next-layer"]["prefetch_issued"] > 0 and modes["streamed"]["prefetch_issued"] == 0
