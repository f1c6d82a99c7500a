"""The disk tier measured (issue 25, item 8): a random-weight checkpoint whose experts are several times the host
RAM the model may take, decoded with a quarter, a half and all of its experts in host slots; each run's disk
read rate against a raw direct read of the same files taken in the same run, and its disk bytes per token
against the two-tier simulator's replay of its own recorded routing. The script is ``bench/disk_tier.py``.

Each run is a fresh process (``python -m offload_bench.disk_tier --run ...``): loading, then
:func:`offload_bench.e2e_runs.timed_generation` (a throwaway pass, prefill, warm-up, timed decode), on the
CPU device in fp32. Reads use direct I/O where the filesystem allows it, so neither figure is the page cache's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

GB = 1e9
CHUNK = 4 << 20  # raw read: bytes per read call


def build_checkpoint(path: Path, layers: int, experts: int, hidden: int, intermediate: int) -> None:
    """A random-weight Qwen3-MoE checkpoint (top-4 routing), fp32, with a byte-sized vocabulary."""
    import torch
    import transformers

    options: dict[str, Any] = dict(
        vocab_size=512, hidden_size=hidden, moe_intermediate_size=intermediate, intermediate_size=hidden,
        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4, head_dim=hidden // 8,
        num_experts=experts, num_experts_per_tok=4, norm_topk_prob=True, max_position_embeddings=512,
    )  # fmt: skip
    config = transformers.Qwen3MoeConfig(**options)
    torch.manual_seed(0)
    transformers.Qwen3MoeForCausalLM(config).save_pretrained(path)


def raw_direct_read(files: list[Path], workers: int) -> dict[str, Any]:
    """GB/s of reading ``files`` whole with direct I/O in 4 MiB calls, ``workers`` files at a time: the rate
    the same disk gives the same bytes without the runtime."""
    import mmap

    buffers = [mmap.mmap(-1, CHUNK) for _ in range(workers)]  # page-aligned, as direct I/O needs

    def read(args: tuple[Path, int]) -> int:
        path, i = args
        flags = os.O_RDONLY | getattr(os, "O_DIRECT", 0)
        fd = os.open(path, flags)
        try:
            total, offset = 0, 0
            while True:
                n = os.preadv(fd, [buffers[i]], offset)
                total += n
                offset += n
                if n < CHUNK:
                    return total
        finally:
            os.close(fd)

    began = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        done = sum(pool.map(read, [(f, i % workers) for i, f in enumerate(files)]))
    seconds = time.perf_counter() - began
    return dict(bytes=done, seconds=seconds, gb_per_s=done / seconds / GB, workers=workers)


def one_run(args: dict[str, Any]) -> dict[str, Any]:
    """In this process: load with the disk tier, time a generation, save the routing; the row's numbers."""
    import torch

    import offload
    from offload.hf.install import runtime_of
    from offload_bench.e2e_runs import timed_generation

    began = time.perf_counter()
    model = offload.from_pretrained(
        args["path"],
        vram_budget=args["budget"],
        device="cpu",
        dtype="fp32",
        max_context=256,
        progress=False,
        disk_tier="always",
        host_memory_limit=args["limit"],
        store_dir=args["store_dir"],
        prefetch=args["prefetch"],
        disk_read_ahead=args.get("read_ahead", False),
        record_trace=True,
    )
    load_s = time.perf_counter() - began
    runtime = runtime_of(model)
    tier = runtime.tier
    assert tier is not None
    prompt = torch.randint(3, 512, (1, args["prompt_tokens"]), generator=torch.Generator().manual_seed(0))
    timed = timed_generation(model, torch.device("cpu"), prompt, 2, args["tokens"], runtime.stats)
    before, after = timed.snapshots["warm"], timed.snapshots["decoded"]
    final = offload.stats(model)
    offload.routing_trace(model).save(args["trace"])
    return dict(
        prefetch=runtime.config.prefetch,
        disk_read_ahead=runtime.config.disk_read_ahead,
        load_s=load_s,
        store_source=final.store_source.split(" (")[0],
        host_slots=tier.pool.num_slots,
        device_slots=runtime.budget.slots,
        total_experts=runtime.survey.total_experts,
        host_plan_bytes=None if runtime.host_plan is None else runtime.host_plan.total_bytes,
        prefill_tok_per_s=prompt.shape[1] / timed.prefill_s,
        decode_tok_per_s=args["tokens"] / timed.decode_s,
        decode=dict(
            disk_reads=after.disk_reads - before.disk_reads,
            disk_bytes=after.disk_bytes - before.disk_bytes,
            disk_seconds=after.disk_seconds - before.disk_seconds,
            host_tier_hits=after.host_tier_hits - before.host_tier_hits,
            host_tier_misses=after.host_tier_misses - before.host_tier_misses,
            expert_misses=after.expert_misses - before.expert_misses,
        ),
        total=dict(
            disk_reads=final.disk_reads,
            disk_bytes=final.disk_bytes,
            disk_seconds=final.disk_seconds,
            disk_gb_per_s=final.disk_gb_per_s,
            host_tier_hits=final.host_tier_hits,
            host_tier_misses=final.host_tier_misses,
            host_tier_read_ahead=final.host_tier_read_ahead,
        ),
        device_capacity=runtime.cache.capacity,
        host_capacity=tier.cache.capacity,
        policy=runtime.config.policy,
    )


def in_child(args: dict[str, Any]) -> dict[str, Any]:
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p),
    }
    done = subprocess.run(
        [sys.executable, "-m", "offload_bench.disk_tier", "--run", json.dumps(args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
    )
    if done.returncode != 0:
        raise RuntimeError(f"disk tier run failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def simulated(row: dict[str, Any], trace: Path) -> dict[str, Any]:
    """The two-tier simulator on the run's own recorded routing: disk bytes per token beside the run's."""
    from cache_policies import load_trace, simulate

    routing = load_trace(trace)
    result = simulate(
        routing, row["policy"], row["device_capacity"], "global", host_tier=row["host_capacity"]
    )
    tier = result.host_tier
    assert tier is not None and tier.disk_bytes is not None
    tokens = result.tokens
    ours = row["total"]["disk_bytes"] / tokens
    sim = tier.disk_bytes / tokens
    return dict(
        tokens=tokens,
        disk_bytes_per_token=ours,
        simulated_disk_bytes_per_token=sim,
        over_simulated=ours / sim if sim else None,
        belady_disk_bytes_per_token=tier.belady_disk_reads
        * (tier.disk_bytes // max(1, tier.disk_reads))
        / tokens,
        simulated_prefetch="none (the simulator replays demand paging and history prefetch only)",
    )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--run":
        print(json.dumps(one_run(json.loads(sys.argv[2]))))
