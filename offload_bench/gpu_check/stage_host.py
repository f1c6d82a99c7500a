"""Stage ``host``: missed experts computed on the CPU (docs/host-compute.md). The host's streaming read
bandwidth, then every host kernel at 1 token on the Qwen3-30B-A3B expert shape in bf16, int4 and MXFP4, on a
host worker's share of the torch threads and on all of them, in GB/s of expert bytes read against a streaming
read taken right before each format's kernels (issue 14's target: 60% at 1 token), and the int4pack copy's
conversion (whether the CPU's layout is the one laid out by uint8 ops). Decode with host compute auto against
off, side by side, is a pair of rows of the ``e2e`` stage, which builds those models anyway."""

from __future__ import annotations

from typing import Any

from offload_bench import host_experts as hx
from offload_bench.gpu_check.part import Part

SHAPE = "Qwen3-30B-A3B"
FORMATS = ("bf16", "int4", "mxfp4")
TARGET_SHARE = 0.6


def run(part: Part, seconds: float) -> None:
    import torch

    cuda = torch.cuda.is_available() and not part.smoke
    threads = hx.thread_counts()
    gib = 1 / 16 if part.smoke else 0.5
    reads = {t: hx.read_bandwidth(gib, torch_threads=t) for t in threads}
    peak = max(reads.values())
    shapes = hx.SMOKE_SHAPES if part.smoke else {SHAPE: hx.EXPERT_SHAPES[SHAPE]}
    part.set(
        device="cuda" if cuda else "cpu",
        host_read_gbps={str(t): g / 1e9 for t, g in reads.items()},
        host_read_peak_gbps=peak / 1e9,
        rows=[],
    )
    for label in FORMATS:  # one format at a time: a stage stopped at its cap keeps the formats it judged
        mine = hx.host_table(shapes, 1 if part.smoke else 2, threads, (label,), (1,), read_gib=gib)
        for row in mine:
            part.add("rows", row)
        if not mine:
            continue
        best = max(mine, key=lambda r: r["gbps"])
        part.target(
            f"host expert GB/s at 1 token >= {TARGET_SHARE:.0%} of the host read ({best['shape']}, {label})",
            round(best["share_of_read"], 3),
            None if part.smoke else best["share_of_read"] >= TARGET_SHARE,
            kernel=best["kernel"],
            torch_threads=best["torch_threads"],
            gbps=best["gbps"],
            read_gbps=best["read_gbps"],
        )
    part.set(int4pack_conversion=int4pack_conversion(shapes))


def int4pack_conversion(shapes: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """Whether this CPU's int4pack layout is the one the runtime lays out by uint8 ops (checked against torch's
    converter; AVX512's is known only from torch's source until a machine with it runs this), and one expert's
    conversion both ways."""
    import torch

    from offload.memory import int4pack

    return dict(
        capability=torch.backends.cpu.get_cpu_capability(),
        fast_layout_blocks_of=32 * int4pack.fast_layout_pairs() or None,
        rows=hx.conversion_table(shapes, 1, [torch.get_num_threads()]),
    )
