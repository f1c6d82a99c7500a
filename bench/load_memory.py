"""Peak host memory and time while loading: offloaded loading against plain transformers, side by side,
and per expert format (``--quantize``: quantized while loading, then read from the compressed-store cache).

Each load runs in a fresh process and samples anonymous RSS (``RssAnon`` in /proc, every millisecond):
memory the load allocates, leaving out the memory-mapped checkpoint pages, which are file-backed and
reclaimable. The checkpoint is a random-weight Mixtral-architecture model built in a temp folder; the
compressed-store cache goes to another temp folder. Beside each offloaded run: the host planner's figure
(``offload.runtime.host_plan``) for the same load, to check it against the measured peak.

    python bench/load_memory.py                      # about 1.2 GB of fp32 experts; writes bench/results/
    python bench/load_memory.py --formats none,int8,int4 --json bench/results/load_formats.json
    python bench/load_memory.py --layers 12 --hidden 256 --intermediate 512 --skip-hf --json -
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# transformers probes for the hub "kernels" package with `import kernels`, which would find bench/kernels.py
# while this script's folder is on sys.path: keep it off.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
RESULTS = Path(__file__).resolve().parent / "results" / "load_memory.json"

from offload_bench.machine import rss_anon, sampled_rss_anon  # noqa: E402  (light: torch imported inside)
from offload_bench.results import write_json  # noqa: E402  (light: json and pathlib only)


def measure(loader: str, path: str, budget: str, quantize: str = "none") -> dict[str, Any]:
    """In this process: load once and return anonymous RSS before, at peak and after."""
    import torch

    if loader == "offload":
        import offload
        from offload.hf.install import runtime_of
    else:
        import transformers
    with sampled_rss_anon() as rss:
        start = time.perf_counter()
        if loader == "offload":
            model = offload.from_pretrained(
                path, vram_budget=budget, device="cpu", max_context=64, progress=False, quantize=quantize
            )
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        seconds = time.perf_counter() - start
    out = {**rss, "after": rss_anon(), "seconds": seconds}
    if loader == "offload":
        from offload.runtime.host_plan import plan_host

        runtime = runtime_of(model)
        planned = plan_host(runtime.survey, runtime.budget.planned_bytes)
        out.update(
            format=runtime.survey.layout.format_name,
            expert_bytes=runtime.survey.layout.nbytes,
            store_source=offload.stats(model).store_source.split(" (")[0],
            planned_host_bytes=planned.total_bytes,
            store_bytes=runtime.store.nbytes,
            resident_bytes=runtime.survey.resident_bytes,
            pool_bytes=runtime.pool.nbytes,
            layer_bytes=runtime.store.nbytes // runtime.survey.num_layers,
        )
    return out


def build(path: Path, layers: int, hidden: int, intermediate: int) -> None:
    import torch
    import transformers

    config = transformers.MixtralConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(config).save_pretrained(path)


def in_subprocess(
    loader: str, path: Path, budget: str, quantize: str = "none", cache: str = ""
) -> dict[str, Any]:
    env = {**os.environ, "MOE_OFFLOAD_CACHE": cache} if cache else None
    out = subprocess.run(
        [sys.executable, __file__, "--measure", loader, str(path), budget, quantize],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--budget", default="200MB", help="offloaded budget (CPU device)")
    p.add_argument("--skip-hf", action="store_true", help="measure only the offloaded load")
    p.add_argument(
        "--formats",
        default="none",
        help="comma-separated --quantize values to load with (none, int8, int4); each quantized one is "
        "loaded twice: quantizing, then from the compressed-store cache (default: none)",
    )
    p.add_argument("--json", default=str(RESULTS), help="output file, or - for stdout")
    p.add_argument(
        "--measure", nargs=4, metavar=("LOADER", "PATH", "BUDGET", "QUANTIZE"), help=argparse.SUPPRESS
    )
    args = p.parse_args(argv)
    if args.measure:
        loader, path, budget, quantize = args.measure
        print(json.dumps(measure(loader, path, budget, quantize)))
        return 0
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if not formats or any(f not in ("none", "int8", "int4") for f in formats):
        p.error(f"--formats: comma-separated none, int8, int4; got {args.formats!r}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt"
        build(path, args.layers, args.hidden, args.intermediate)
        runs = {}
        for fmt in formats:
            if fmt == "none":
                runs["offload"] = in_subprocess("offload", path, args.budget)
                continue
            cache = str(Path(tmp) / "cache")
            runs[f"offload-{fmt}"] = in_subprocess("offload", path, args.budget, fmt, cache)
            runs[f"offload-{fmt}-cached"] = in_subprocess("offload", path, args.budget, fmt, cache)
        if not args.skip_hf:
            runs["transformers"] = in_subprocess("transformers", path, args.budget)
    mib = 2**20
    report = {
        "what": "peak anonymous RSS growth while loading a random-weight Mixtral-architecture checkpoint (fp32, CPU)",
        "command": "python bench/load_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "model": {
            "layers": args.layers,
            "hidden": args.hidden,
            "intermediate": args.intermediate,
            "experts": 8,
        },
        "runs": runs,
    }
    for name, run in runs.items():
        grown = (run["peak"] - run["baseline"]) / mib
        line = f"{name:>19}: peak grew {grown:8.1f} MiB during load, {run['seconds']:6.2f} s"
        if "store_bytes" in run:
            final = (run["store_bytes"] + run["resident_bytes"] + run["pool_bytes"]) / mib
            line += (
                f"; {run['format']} experts of {run['expert_bytes'] / mib:.2f} MiB, store + resident + slots "
                f"{final:.1f} MiB, host planner {run['planned_host_bytes'] / mib:.1f} MiB"
            )
            if run["store_source"]:
                line += f" ({run['store_source']})"
        print(line)
    write_json(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
