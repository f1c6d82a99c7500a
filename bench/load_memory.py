"""Peak host memory while loading: offloaded loading against plain transformers, side by side.

Each load runs in a fresh process and samples anonymous RSS (``RssAnon`` in /proc, every millisecond):
memory the load allocates, leaving out the memory-mapped checkpoint pages, which are file-backed and
reclaimable. The checkpoint is a random-weight Mixtral-architecture model built in a temp folder.

    python bench/load_memory.py                      # about 600 MB of fp32 experts; writes bench/results/
    python bench/load_memory.py --layers 12 --hidden 256 --intermediate 512 --skip-hf --json -
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

# transformers probes for the hub "kernels" package with `import kernels`, which would find bench/kernels.py
# while this script's folder is on sys.path: keep it off.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
RESULTS = Path(__file__).resolve().parent / "results" / "load_memory.json"


def rss_anon() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def measure(loader: str, path: str, budget: str) -> dict[str, int]:
    """In this process: load once and return anonymous RSS before, at peak and after."""
    import torch

    if loader == "offload":
        import offload
        from offload.hf.install import runtime_of
    else:
        import transformers
    peak = baseline = rss_anon()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_anon())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    if loader == "offload":
        model = offload.from_pretrained(
            path, vram_budget=budget, device="cpu", max_context=64, progress=False
        )
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    out = {"baseline": baseline, "peak": max(peak, rss_anon()), "after": rss_anon(), "seconds": seconds}
    if loader == "offload":
        runtime = runtime_of(model)
        out.update(
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


def in_subprocess(loader: str, path: Path, budget: str) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, __file__, "--measure", loader, str(path), budget],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--budget", default="200MB", help="offloaded budget (CPU device)")
    p.add_argument("--skip-hf", action="store_true", help="measure only the offloaded load")
    p.add_argument("--json", default=str(RESULTS), help="output file, or - for stdout")
    p.add_argument("--measure", nargs=3, metavar=("LOADER", "PATH", "BUDGET"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        loader, path, budget = args.measure
        print(json.dumps(measure(loader, path, budget)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt"
        build(path, args.layers, args.hidden, args.intermediate)
        runs = {"offload": in_subprocess("offload", path, args.budget)}
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
        print(f"{name:>12}: peak grew {grown:8.1f} MiB during load, {run['seconds']:.2f} s")
    off = runs["offload"]
    final = (off["store_bytes"] + off["resident_bytes"] + off["pool_bytes"]) / mib
    print(f"{'':>12}  offloaded final footprint (store + resident + slot pool) {final:.1f} MiB")
    text = json.dumps(report, indent=2) + "\n"
    if args.json == "-":
        sys.stdout.write(text)
    else:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
