"""The disk tier (offload.runtime.host_tier): experts on disk under a cache of host slots. Outputs equal the
all-in-RAM run bitwise at any number of host slots, with every policy and predictor and with reads and copies
delayed at random; its counters add up; a second load reads the store; bad limits and a full disk fail in one
line, leaving nothing half-written."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest
import torch

import offload
from cache_policies import ONLINE_POLICIES
from offload.config import OffloadConfig
from offload.errors import HostMemoryError, OffloadError
from offload.hf.expert_formats import with_format
from offload.hf.install import runtime_of
from offload.hf.skeleton import survey_checkpoint
from offload.memory.copy_engines import injected_copy_delays
from offload.memory.disk_reader import injected_read_delays
from offload.runtime.budget import budget_for_slots
from offload.runtime.host_plan import disk_tier_limit
from tests.helpers import prompt, slot_counts

NEW_TOKENS = 6


def load(path: Path, device_slots: int, host_slots: int | None = None, **options) -> torch.nn.Module:
    """``path`` on the CPU device in fp32 with exactly ``device_slots`` slots; with ``host_slots``, the experts
    on disk (disk_tier="always") under exactly that many host slots, else all in host RAM."""
    config = OffloadConfig.create(1, device="cpu", dtype="fp32", max_context=64, **options)
    survey = with_format(survey_checkpoint(str(path), config.dtype), config, None)
    budget = budget_for_slots(survey, config, device_slots)
    if host_slots is not None:
        limit = disk_tier_limit(survey, host_slots, device_bytes=budget)
        options.update(disk_tier="always", host_memory_limit=limit)
    return offload.from_pretrained(
        path, vram_budget=budget, device="cpu", dtype="fp32", max_context=64, progress=False, **options
    )


def run(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits = model(prompt("cpu")).logits
    return logits, model.generate(prompt("cpu"), max_new_tokens=NEW_TOKENS, do_sample=False)


@pytest.fixture
def path(tiny_checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MOE_OFFLOAD_CACHE", str(tmp_path / "cache"))  # each test writes its own store
    return tiny_checkpoints["qwen3_moe"]


def host_counts(path: Path) -> dict[str, int]:
    """Host slots: one access's worth (the minimum), a third of the experts, all of them."""
    s = survey_checkpoint(str(path))
    return {"minimum": s.top_k, "third": s.total_experts // 3, "all": s.total_experts}


@pytest.mark.parametrize("host", ["minimum", "third", "all"])
@pytest.mark.parametrize(
    ("policy", "prefetch"),
    [
        *((policy, "none") for policy in ONLINE_POLICIES if policy != "static"),  # static: tested apart
        *(("lru", prefetch) for prefetch in ("history", "lookahead", "pre-attention")),
    ],
)
def test_outputs_equal_the_all_in_ram_run(path: Path, host: str, policy: str, prefetch: str) -> None:
    device_slots = slot_counts(path)["quarter"]
    ram = load(path, device_slots, policy=policy, prefetch=prefetch)
    assert runtime_of(ram).tier is None
    expected = run(ram)
    offload.close(ram)
    host_slots = host_counts(path)[host]
    read_ahead = prefetch != "none"  # guesses start reads (off by default): the racier path
    with injected_read_delays(0, 0.002, seed=1), injected_copy_delays(0, 0.001, seed=2):
        model = load(
            path, device_slots, host_slots, policy=policy, prefetch=prefetch, disk_read_ahead=read_ahead
        )
    tier = runtime_of(model).tier
    assert tier is not None and tier.pool.num_slots == host_slots
    got = run(model)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    stats = offload.stats(model)
    assert stats.disk_reads >= stats.host_tier_misses > 0 and stats.host_tier_slots == host_slots
    assert stats.host_tier_read_ahead > 0  # a wave's reads ran while the rest of it computed
    prefetcher = runtime_of(model).step.prefetcher
    if prefetcher is not None and host != "all":
        assert prefetcher.read_ahead > 0  # guesses not in RAM started reads instead of copies
    offload.close(model)


def test_counters_add_up_and_host_compute_takes_only_experts_in_ram(path: Path) -> None:
    """Every device copy is one host-tier access (a disk read when it missed); host compute, asked to take
    every miss, takes only those in RAM, and the outputs stay those of the all-in-RAM run."""
    device_slots = slot_counts(path)["top_k"]
    ram = load(path, device_slots, host_compute="always")
    expected = run(ram)
    ram_calls = offload.stats(ram).host_expert_calls
    model = load(path, device_slots, host_counts(path)["third"], host_compute="always")
    got = run(model)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    stats = offload.stats(model)
    tier = runtime_of(model).tier
    assert tier is not None and tier.reader is not None
    assert stats.host_tier_hits + stats.host_tier_misses == stats.expert_misses + stats.host_expert_calls
    assert stats.disk_reads == tier.cache.misses + stats.host_tier_read_ahead
    assert stats.disk_bytes == stats.disk_reads * tier.pool.stride
    assert 0 < stats.host_expert_calls < ram_calls  # only experts already in RAM
    assert stats.disk_seconds > 0 and stats.as_dict()["disk_gb_per_s"] > 0


def test_the_second_load_reads_the_store_and_a_truncated_one_is_rebuilt(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    device_slots, host_slots = slot_counts(path)["quarter"], host_counts(path)["all"]
    first = load(path, device_slots, host_slots)
    source = offload.stats(first).store_source
    assert source.startswith("written from the checkpoint, stored on disk for the next load")
    expected = run(first)
    second = load(path, device_slots, host_slots)
    assert offload.stats(second).store_source.startswith("read from the disk store")
    got = run(second)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    folder = Path(source.rsplit("(", 1)[1].rstrip(")"))
    victim = folder / "layer-0001.safetensors"
    victim.write_bytes(victim.read_bytes()[:-4096])
    with caplog.at_level(logging.WARNING, logger="offload"):
        third = load(path, device_slots, host_slots)
    rebuilt = [r.getMessage() for r in caplog.records if "unusable" in r.getMessage()]
    assert len(rebuilt) == 1 and "layer-0001.safetensors" in rebuilt[0]
    assert "again" in offload.stats(third).store_source
    got = run(third)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_quantized_experts_go_to_disk_quantized(path: Path) -> None:
    device_slots = slot_counts(path)["quarter"]
    ram = load(path, device_slots, quantize="int4", store_cache=False)
    expected = run(ram)
    model = load(path, device_slots, host_counts(path)["third"], quantize="int4")
    assert offload.stats(model).expert_format == "int4"
    assert offload.stats(model).store_source.startswith("quantized while loading, stored on disk")
    got = run(model)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_auto_keeps_the_experts_on_disk_only_when_they_do_not_fit(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    device_slots = slot_counts(path)["quarter"]
    with caplog.at_level(logging.WARNING, logger="offload"):
        roomy = offload.from_pretrained(path, vram_budget="1GB", device="cpu", max_context=64, progress=False)
    assert runtime_of(roomy).tier is None and not caplog.records
    tight = load(path, device_slots, host_counts(path)["third"])
    limit = runtime_of(tight).config.host_memory_limit
    with caplog.at_level(logging.WARNING, logger="offload.runtime.host_plan"):
        model = load(path, device_slots, disk_tier="auto", host_memory_limit=limit)
    assert runtime_of(model).tier is not None
    [line] = [r.getMessage() for r in caplog.records if r.name == "offload.runtime.host_plan"]
    assert "keeping them on disk" in line and "experts in host slots" in line and "\n" not in line
    with pytest.raises(HostMemoryError, match="disk_tier='auto' would keep the experts on disk"):
        load(path, device_slots, disk_tier="off", host_memory_limit=limit)


def test_a_limit_below_the_tier_s_minimum_states_the_minimum(path: Path) -> None:
    device_slots = slot_counts(path)["quarter"]
    minimum = runtime_of(load(path, device_slots, host_counts(path)["minimum"])).config.host_memory_limit
    assert minimum is not None
    with pytest.raises(HostMemoryError) as caught:
        load(path, device_slots, disk_tier="auto", host_memory_limit=minimum - 1)
    message = str(caught.value)
    assert "\n" not in message and "keeping the experts on disk needs at least" in message
    assert caught.value.needed_bytes == minimum  # the limit the tier needs, exactly


def test_a_full_disk_while_writing_fails_in_one_line_and_leaves_nothing(
    path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from offload.memory import disk_store

    real, calls = disk_store._write_rows, {"n": 0}

    def full_on_the_second_layer(*args, **kwargs) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(*args, **kwargs)

    monkeypatch.setattr(disk_store, "_write_rows", full_on_the_second_layer)
    stores = tmp_path / "stores"
    with pytest.raises(OffloadError, match="could not write MoE layer 1 to disk") as caught:
        load(path, slot_counts(path)["quarter"], host_counts(path)["third"], store_dir=str(stores))
    assert "\n" not in str(caught.value)
    assert not any(stores.iterdir())  # no half-written store, no partial folder


CHILD = """
import json, sys
import torch
import offload
from offload.hf.install import runtime_of
from offload_bench.machine import sampled_rss_anon

path, budget, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.zeros(1)  # torch's own start-up allocations before the baseline
with sampled_rss_anon() as rss:
    model = offload.from_pretrained(path, vram_budget=budget, device="cpu", dtype="fp32", max_context=64,
                                    progress=False, host_memory_limit=limit)
    model.generate(torch.randint(0, 256, (1, 8)), max_new_tokens=8, do_sample=False)
runtime = runtime_of(model)
plan = runtime.host_plan
print(json.dumps(dict(rss, plan=plan.total_bytes, device=plan.device_bytes,
                      layer=runtime.survey.num_experts * runtime.survey.layout.nbytes,
                      experts=runtime.survey.total_experts * runtime.survey.layout.nbytes,
                      host_slots=runtime.tier.pool.num_slots, reads=offload.stats(model).disk_reads)))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux /proc")
def test_peak_host_memory_stays_within_the_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh process loads a model whose experts (151 MB) are six times the host slots it may take, and
    generates: anonymous RSS (the checkpoint's memory-mapped pages and the page cache are not the model's)
    grows by at most the host plan (on the CPU device, the device budget too) plus 48 MiB of allocator and
    interpreter noise, below what keeping every expert in RAM would take."""
    import json
    import subprocess
    import sys

    import transformers

    from tests.helpers import ROOT

    config = transformers.MixtralConfig(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=12, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(config).save_pretrained(tmp_path / "ckpt")
    device_slots, host_slots = 8, 16
    settings = OffloadConfig.create(1, device="cpu", dtype="fp32", max_context=64)
    survey = survey_checkpoint(str(tmp_path / "ckpt"), torch.float32)
    budget = budget_for_slots(survey, settings, device_slots)
    limit = disk_tier_limit(survey, host_slots, device_bytes=budget)
    env = {**os.environ, "MOE_OFFLOAD_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "ckpt"), str(budget), str(limit)],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    m = json.loads(done.stdout.strip().splitlines()[-1])
    assert m["host_slots"] == host_slots and m["reads"] > 0 and m["plan"] <= limit
    grown = m["peak"] - m["baseline"]
    in_ram = m["device"] + m["experts"] + m["layer"]  # every expert in host RAM: what disk_tier="off" needs
    assert m["experts"] >= 144 * 2**20 and m["plan"] + 48 * 2**20 < in_ram
    assert grown <= m["plan"] + 48 * 2**20, (
        f"peak grew {grown / 2**20:.0f} MiB, plan {m['plan'] / 2**20:.0f} MiB"
    )


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("policy", [p for p in ONLINE_POLICIES if p != "static"])
def test_the_simulator_replays_both_tiers_exactly(path: Path, policy: str, scope: str) -> None:
    """A recorded run with the disk tier (a 12-token prefill, then decode) replays in the two-tier
    simulator with the runtime's counts for both tiers; Belady's RAM tier reads no more than it did."""
    from cache_policies import simulate

    device_slots, host_slots = (12, 24) if scope == "layer" else (9, 16)  # per layer: top-k each, and more
    options = dict(policy=policy, cache_scope=scope, seed=7, prefetch="none", record_trace=True)
    model = load(path, device_slots, host_slots, **options)  # demand paging, as the simulator replays it
    model.generate(prompt("cpu"), max_new_tokens=10, do_sample=False)
    stats = offload.stats(model)
    runtime = runtime_of(model)
    tier = runtime.tier
    assert tier is not None
    result = simulate(
        offload.routing_trace(model),
        policy,
        runtime.cache.capacity,
        scope,
        options={"seed": 7} if policy == "random" else None,
        host_tier=tier.cache.capacity,
    )
    assert (result.hits, result.misses) == (stats.expert_hits, stats.expert_misses)
    two = result.host_tier
    assert two is not None and two.slots == stats.host_tier_slots == host_slots
    assert (two.hits, two.misses, two.read_ahead) == (
        stats.host_tier_hits,
        stats.host_tier_misses,
        stats.host_tier_read_ahead,
    )
    assert two.disk_reads == stats.disk_reads and two.disk_bytes == stats.disk_bytes
    assert 0 < two.belady_disk_reads <= two.disk_reads


def test_guesses_start_no_reads_unless_asked(path: Path) -> None:
    """disk_read_ahead off (the default): a guess copies the experts already in RAM and leaves the rest to
    demand; the outputs are the all-in-RAM run's."""
    device_slots, host_slots = slot_counts(path)["quarter"], host_counts(path)["all"]
    expected = run(load(path, device_slots, prefetch="lookahead"))
    model = load(path, device_slots, host_slots, prefetch="lookahead")
    got = run(model)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    prefetcher = runtime_of(model).step.prefetcher
    assert prefetcher is not None and prefetcher.read_ahead == 0 and offload.stats(model).prefetch_issued > 0
