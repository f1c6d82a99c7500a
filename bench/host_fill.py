"""Filling fresh host memory, as the host store (and a random benchmark model) does once per load: a new
anonymous memory map written from a warm source, with and without transparent huge pages asked for
(``madvise(MADV_HUGEPAGE)``, what ``offload.memory.host_memory.mapped_zeros`` does), and torch's own allocator,
side by side in one run; the warm copy is the ceiling.

    python bench/host_fill.py [--gib 1] [--repeats 3] [--out bench/results/host_fill.json]
"""

from __future__ import annotations

import argparse
import datetime
import mmap
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from offload_bench.results import write_json  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gib", type=float, default=1.0, help="GiB written per measurement")
    p.add_argument("--repeats", type=int, default=3, help="measurements per kind (the best is reported)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "host_fill.json")
    args = p.parse_args()
    import torch

    n = int(args.gib * 2**30)
    source = torch.ones(n, dtype=torch.uint8)

    def fresh_map(huge: bool) -> torch.Tensor:
        region = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if huge:
            region.madvise(mmap.MADV_HUGEPAGE)
        return torch.frombuffer(region, dtype=torch.uint8)

    kinds = {
        "map, 4 KiB pages": lambda: fresh_map(False),
        "map, huge pages asked for": lambda: fresh_map(True),
        "torch.empty": lambda: torch.empty(n, dtype=torch.uint8),
    }
    rows = []
    for _ in range(args.repeats):  # interleaved: each kind sees the same moments of a shared machine
        for kind, make in kinds.items():
            began = time.perf_counter()
            buffer = make()
            buffer.copy_(source)
            rows.append(dict(kind=kind, gb_per_s=n / (time.perf_counter() - began) / 1e9))
            del buffer
    warm = torch.empty(n, dtype=torch.uint8)
    warm.copy_(source)
    best_warm = 0.0
    for _ in range(args.repeats):
        began = time.perf_counter()
        warm.copy_(source)
        best_warm = max(best_warm, n / (time.perf_counter() - began) / 1e9)
    best = {kind: max(r["gb_per_s"] for r in rows if r["kind"] == kind) for kind in kinds}
    for kind, gbps in best.items():
        print(f"{kind:28} {gbps:6.2f} GB/s (best of {args.repeats})")
    print(f"{'warm copy (ceiling)':28} {best_warm:6.2f} GB/s")
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    write_json(
        dict(
            command=" ".join(["python", "bench/host_fill.py", *sys.argv[1:]]),
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            host=dict(machine=platform.machine(), torch_threads=torch.get_num_threads()),
            transparent_hugepage=thp.read_text().strip() if thp.is_file() else None,
            bytes=n,
            best_gb_per_s=best,
            warm_copy_gb_per_s=best_warm,
            rows=rows,
        ),
        args.out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
