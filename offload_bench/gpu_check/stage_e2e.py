"""Stage ``e2e``: decode at real expert and hidden shapes at a 12 GB budget (offload_bench.e2e): Qwen3-30B-A3B
cut to 8 of its 48 layers and Mixtral-8x7B cut to 4 of its 32, so that building and timing fit the stage's cap.
A cut model gets the budget that holds the same fraction of its experts as 12 GB holds of the full model's
(``--scale-budget``), so the hit rate and the copies per layer are the full model's. Random weights route with
their own random routers: hit rates are not those of trained models.

Qwen3 runs LRU (host compute auto, the default), LRU with host compute off (the side-by-side the host
stage's issue asks for), pre-attention prefetch (what the default prefetch="auto" picks), lookahead, LRU with
int4 experts, the same with half of them in host slots and the rest on disk (the disk tier: disk -> RAM ->
VRAM), and accelerate's offload at the same cap; Mixtral LRU and accelerate. Every row
prints its estimated build and run time first (offload_bench.e2e_estimate, calibrated on this machine) and is
skipped, with its estimate as the reason, when it would not finish within the cap; each row's targets are
judged as soon as it ends, so a stage stopped at its cap keeps every verdict it reached. The row lists were cut
to fit the cap from estimates made on the CPU machine (docs/e2e.md).
"""

from __future__ import annotations

import argparse
from typing import Any

from offload_bench import e2e
from offload_bench.e2e_report import targets
from offload_bench.gpu_check.part import Part

# shape -> (layers it is cut to on the GPU, the variants it runs, most telling first)
RUNS = {
    "qwen3-30b-a3b": (
        8,
        ["lru", "lru-host-off", "pre-attention", "lookahead", "int4", "int4-disk", "accelerate"],
    ),
    "mixtral-8x7b": (4, ["lru", "accelerate"]),
}
COMMON = [
    "--vram-budget", "12GB", "--scale-budget", "--routing-trace", "none", "--prompt-tokens", "64",
    "--warmup-tokens", "3", "--decode-tokens", "16", "--accelerate-decode-tokens", "3",
]  # fmt: skip
SMOKE = ["--smoke", "--shapes", "qwen3-30b-a3b", "--variants=lru", "--variants=lru-host-off",
         "--variants=int4", "--variants=int4-disk", "--variants=accelerate"]  # fmt: skip
PEAK = "peak device memory <= budget"
MARGIN_S = {False: 10.0, True: 3.0}  # of the cap, kept for handing over: never planned for a row


def runs(smoke: bool) -> list[list[str]]:
    """The argument lists of the stage's ``offload-bench e2e`` runs, in order."""
    if smoke:  # the stage's plumbing within its cap; tests/offload_bench/test_e2e.py runs all variants
        return [SMOKE]
    return [
        [*COMMON, "--shapes", shape, "--layers", str(layers), *(f"--variants={v}" for v in variants)]
        for shape, (layers, variants) in RUNS.items()
    ]


def run(part: Part, seconds: float) -> None:
    results: list[dict[str, Any]] = []
    part.set(
        device="cpu" if part.smoke else "cuda", runs=[" ".join(a) for a in runs(part.smoke)], results=results
    )
    for i, argv in enumerate(runs(part.smoke)):
        left = seconds - MARGIN_S[part.smoke] - part.elapsed()
        out = part.path.with_name(f"{part.path.stem}-e2e-{i}.json")
        parser = argparse.ArgumentParser(prog="offload-bench e2e")
        e2e.add_arguments(parser)
        full = [*argv, "--time-limit", f"{max(left, 0):.0f}", "--out", str(out)]
        results.append({})

        def on_row(row: dict[str, Any], result: dict[str, Any], i: int = i) -> None:
            results[i] = result
            part.set(results=results)
            judge(part, results)

        code = e2e.run(parser.parse_args(full), parser.prog, full, on_row=on_row)
        if code != 0:
            raise RuntimeError(f"offload-bench e2e {' '.join(argv)} exited with {code}")
    judge(part, results)


def judge(part: Part, results: list[dict[str, Any]]) -> None:
    """The targets the rows so far decide, as the e2e benchmark judges them (each judged again, in place, as
    rows come in), and every offloaded row's peak device memory against its budget: an invariant."""
    for result in results:
        rows = result.get("rows", [])
        shapes = list(dict.fromkeys(r["shape"] for r in rows))
        for t in targets(rows, shapes):
            met = {"PASS": True, "FAIL": False}.get(t["status"])
            part.target(
                f"{t['target']} ({t['shape']}, {t['variant']})",
                t["value"],
                None if part.smoke else met,
                **t["inputs"],
            )
        for row in rows:
            if row.get("status") != "ran" or row["variant"] == "accelerate":
                continue
            peak = row.get("peak_device_bytes")
            part.target(
                f"{PEAK} ({row['shape']}, {row['variant']})",
                None if peak is None else round(peak / row["budget_bytes"], 4),
                None if peak is None else peak <= row["budget_bytes"],
                invariant=True,
                budget_bytes=row["budget_bytes"],
                peak_device_bytes=peak,
            )
