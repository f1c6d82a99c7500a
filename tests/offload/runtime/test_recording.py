"""Recording routing from real runs, and the simulator making the runtime's decisions (invariant *same-decisions*)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import offload
from cache_policies import ONLINE_POLICIES, AccessSequence, RoutingTrace, expert_counts, load_trace, simulate
from offload.hf.install import runtime_of
from tests.conftest import reference_model
from tests.helpers import load, prompt


def run_recorded(path: Path, slots: int, **options) -> torch.nn.Module:
    model = load(path, slots, "cpu", record_trace=True, **options)
    model.generate(prompt("cpu"), max_new_tokens=10, do_sample=False)  # a 12-token prefill, then decode
    return model


def test_recorded_trace_is_the_routing(mixtral_checkpoint: Path, tmp_path: Path) -> None:
    model = run_recorded(mixtral_checkpoint, 6)
    trace = offload.routing_trace(model)
    runtime = runtime_of(model)
    assert trace.num_steps == 10 and trace.num_layers == runtime.survey.num_layers
    assert trace.tokens_per_step().tolist() == [12] + [1] * 9
    assert trace.top_k == 2 and trace.num_experts == 8 and trace.expert_bytes == runtime.survey.layout.nbytes
    # The same ids the unmodified model's routers choose, seen through HF's own router outputs.
    ref = reference_model(mixtral_checkpoint)
    with torch.no_grad():
        out = ref(prompt("cpu"), output_router_logits=True)
    for layer, logits in enumerate(out.router_logits):
        top = torch.topk(logits, 2, dim=-1).indices.sort(dim=-1).values
        assert torch.equal(torch.from_numpy(trace.step_ids(0)[:, layer]).sort(dim=-1).values, top)
    saved = trace.save(tmp_path / "run.npz")
    again = load_trace(saved)
    assert isinstance(again, RoutingTrace)
    assert (again.ids == trace.ids).all() and (again.step_offsets == trace.step_offsets).all()


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("policy", ONLINE_POLICIES)
def test_simulator_replays_the_runtime_exactly(
    policy: str, scope: str, tiny_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """Record a run, replay its trace in the simulator with the same policy and capacity: same hits, misses."""
    path = tiny_checkpoints["qwen3_moe"]  # 16 experts, top-4: room for policies to differ
    options: dict = {"cache_scope": scope, "seed": 7, "prefetch": "none"}  # demand paging, as simulated
    sim_options: dict = {"seed": 7} if policy == "random" else {}
    if policy == "static":  # profile on another run (all experts resident), as a user would
        profile = offload.routing_trace(run_recorded(path, 48)).save(tmp_path / "profile.npz")
        options["static_profile"] = str(profile)
        sim_options = {"profile": expert_counts(AccessSequence.from_trace(load_trace(profile)))}
    slots = 4 * 3 if scope == "layer" else 9  # per layer: top-k each; global: a bit over two layers' top-k
    model = run_recorded(path, slots, policy=policy, **options)
    stats = offload.stats(model)
    result = simulate(
        offload.routing_trace(model), policy, runtime_of(model).cache.capacity, scope, options=sim_options
    )
    assert (result.hits, result.misses) == (stats.expert_hits, stats.expert_misses)
    assert result.misses > 0 and result.hits > 0


def test_bad_policy_inputs(mixtral_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(offload.OffloadError, match="only in the simulator"):
        load(mixtral_checkpoint, 4, "cpu", policy="belady")
    with pytest.raises(offload.OffloadError, match="static_profile"):
        load(mixtral_checkpoint, 4, "cpu", policy="static")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a trace")
    with pytest.raises(offload.OffloadError, match="static profile"):
        load(mixtral_checkpoint, 4, "cpu", policy="static", static_profile=str(garbage))
    with pytest.raises(offload.OffloadError, match="half_life"):
        load(mixtral_checkpoint, 4, "cpu", policy="lru", policy_options={"half_life": 3})
    with pytest.raises(ValueError, match="record_trace=True"):
        offload.routing_trace(load(mixtral_checkpoint, 4, "cpu"))


def test_lazy_exports_are_complete() -> None:
    import offload as package

    assert sorted(package.__all__) == sorted(package._EXPORTS)
    for name in package.__all__:
        assert getattr(package, name) is not None


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("policy", ["lru", "lfu", "lfru", "fifo"])
def test_simulator_replays_history_prefetch_exactly(
    policy: str, scope: str, tiny_checkpoints: dict[str, Path]
) -> None:
    """With history prefetch too, the simulator makes the runtime's decisions: demand hits and misses,
    prefetches issued, used (in time or late) and wasted."""
    path = tiny_checkpoints["qwen3_moe"]
    slots = 5 * 3 if scope == "layer" else 14
    model = run_recorded(path, slots, policy=policy, cache_scope=scope, prefetch="history", history_window=4)
    stats = offload.stats(model)
    result = simulate(
        offload.routing_trace(model),
        policy,
        runtime_of(model).cache.capacity,
        scope,
        prefetch="history",
        history_window=4,
    )
    assert (result.hits, result.misses) == (stats.expert_hits, stats.expert_misses)
    assert result.prefetch_issued == stats.prefetch_issued > 0
    assert result.prefetch_hits == stats.prefetch_used + stats.prefetch_late
    assert result.prefetch_wasted == stats.prefetch_wasted
