"""Stage ``e2e``: decode at real expert and hidden shapes at a 12 GB budget (offload_bench.e2e): Qwen3-30B-A3B
cut to 12 of its 48 layers and Mixtral-8x7B cut to 4 of its 32, so that building and timing fit the stage's
cap. A cut model gets the budget that holds the same fraction of its experts as 12 GB holds of the full
model's (``--scale-budget``), so the hit rate and the copies per layer are the full model's. Each shape runs
LRU, lookahead and pre-attention prefetch (pre-attention: what the default prefetch="auto" picks for both), and
accelerate's offload at the same cap, with the copy floor per token
beside each; Qwen3 also runs LRU with int4 experts (quantizing Mixtral's 4 layers would not fit the cap). Random weights route with their own random routers: hit rates are not those of trained models."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from offload_bench import e2e
from offload_bench.gpu_check.part import Part

# shape -> layers it is cut to on the GPU
SHAPES = {"qwen3-30b-a3b": 12, "mixtral-8x7b": 4}
# shape -> the variants it runs (default: all of offload_bench.e2e.VARIANTS)
ONLY = {"mixtral-8x7b": ["lru", "lookahead", "pre-attention", "accelerate"]}
COMMON = [
    "--vram-budget", "12GB", "--scale-budget", "--routing-trace", "none", "--prompt-tokens", "64",
    "--warmup-tokens", "3", "--decode-tokens", "16", "--accelerate-decode-tokens", "3",
]  # fmt: skip
PEAK = "peak device memory <= budget"


def run(part: Part, seconds: float) -> None:
    runs = (
        # the smoke run checks this stage's plumbing within its cap; tests/offload_bench/test_e2e.py runs all
        [
            [
                "--smoke",
                "--shapes",
                "qwen3-30b-a3b",
                *(f"--variants={v}" for v in ("lru", "int4", "accelerate")),
            ]
        ]
        if part.smoke
        else [
            [*COMMON, "--shapes", shape, "--layers", str(layers), *_variants(shape)]
            for shape, layers in SHAPES.items()
        ]
    )
    results: list[dict[str, Any]] = []
    part.set(device="cpu" if part.smoke else "cuda", runs=[" ".join(argv) for argv in runs], results=results)
    for i, argv in enumerate(runs):
        out = part.path.with_name(f"{part.path.stem}-e2e-{i}.json")
        parser = argparse.ArgumentParser(prog="offload-bench e2e")
        e2e.add_arguments(parser)
        full = [*argv, "--out", str(out)]
        part.set(partial_outputs=[*part.data.get("partial_outputs", []), str(out)])
        code = e2e.run(parser.parse_args(full), parser.prog, full)
        if code != 0:
            raise RuntimeError(f"offload-bench e2e {' '.join(argv)} exited with {code}")
        results.append(json.loads(Path(out).read_text()))
        part.set(results=results)
    judge(part, results)


def _variants(shape: str) -> list[str]:
    return [arg for variant in ONLY.get(shape, []) for arg in ("--variants", variant)]


def judge(part: Part, results: list[dict[str, Any]]) -> None:
    """The targets of the e2e runs, as the runs judged them, and every offloaded row's peak against its budget."""
    for result in results:
        for t in result["targets"]:
            met = {"PASS": True, "FAIL": False}.get(t["status"])
            part.target(
                f"{t['target']} ({t['shape']}, {t['variant']})",
                t["value"],
                None if part.smoke else met,
                **t["inputs"],
            )
        for row in result["rows"]:
            if row.get("status") != "ran" or row["variant"] == "accelerate":
                continue
            peak = row.get("peak_device_bytes")
            part.target(
                f"{PEAK} ({row['shape']}, {row['variant']})",
                None if peak is None else round(peak / row["budget_bytes"], 4),
                None if peak is None else peak <= row["budget_bytes"],
                budget_bytes=row["budget_bytes"],
                peak_device_bytes=peak,
            )
