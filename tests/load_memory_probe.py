"""Run in a fresh process: load a checkpoint offloaded and report anonymous RSS before and at peak.

Anonymous RSS (RssAnon) leaves out the memory-mapped checkpoint pages, which are file-backed and
reclaimable; it is what loading allocates. Sampled every millisecond on a thread.
"""

from __future__ import annotations

import json
import sys
import threading
import time


def rss_anon() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def main(path: str, budget: str) -> None:
    import offload
    from offload.hf import runtime_of

    peak = baseline = rss_anon()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_anon())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    model = offload.from_pretrained(path, vram_budget=budget, device="cpu", max_context=64, progress=False)
    done.set()
    sampler.join()
    runtime = runtime_of(model)
    print(
        json.dumps(
            {
                "baseline": baseline,
                "peak": max(peak, rss_anon()),
                "after": rss_anon(),
                "store_bytes": runtime.store.nbytes,
                "resident_bytes": runtime.survey.resident_bytes,
                "pool_bytes": runtime.pool.nbytes,
                "layer_bytes": runtime.store.nbytes // runtime.survey.num_layers,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
