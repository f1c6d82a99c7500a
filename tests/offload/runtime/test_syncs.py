"""Host syncs per MoE layer call: exactly one device-to-host read in every prefetch mode (the routing, with a
router predictor's ids riding along) but pre-attention, which reads its guess before the layer runs (two), one
more when recording a trace. Counted on the CPU by the host reads
the code path makes, and on a GPU by torch's own sync debug mode."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from offload.hf.install import runtime_of
from tests.helpers import load, prompt, slot_counts

READS = ("cpu", "tolist", "item", "__bool__", "__int__", "__float__", "__index__")  # what syncs on CUDA


def decode_steps(model: torch.nn.Module, device: str, steps: int = 3) -> None:
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(prompt(device), past_key_values=cache, use_cache=True)
        ids = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            ids = model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)


def reads_per_layer_call(model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch, steps: int = 3) -> float:
    """Host reads of tensors (``.cpu()``, ``.tolist()``, ``.item()``, ...) made inside MoE layer calls and the
    runtime's work before each decoder layer, per layer call, over ``steps`` decode steps (the prefill is not
    counted)."""
    runtime = runtime_of(model)
    decode_steps(model, "cpu", steps=1)  # warm: the cache holds the prompt's experts
    state = {"inside": False, "reads": 0, "calls": 0}

    def counting(name: str):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            if state["inside"]:
                state["reads"] += 1
            return original(self, *args, **kwargs)

        return wrapper

    def inside(original, counts_call: bool):
        def call(*args, **kwargs):
            state["inside"], state["calls"] = True, state["calls"] + counts_call
            try:
                return original(*args, **kwargs)
            finally:
                state["inside"] = False

        return call

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        ids = model(prompt("cpu"), past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        for name in READS:
            monkeypatch.setattr(torch.Tensor, name, counting(name))
        monkeypatch.setattr(runtime, "forward_layer", inside(runtime.forward_layer, True))
        monkeypatch.setattr(runtime, "before_layer", inside(runtime.before_layer, False))
        for _ in range(steps):
            ids = model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    monkeypatch.undo()
    return state["reads"] / state["calls"]


@pytest.mark.parametrize(
    ("prefetch", "reads"), [("none", 1), ("history", 1), ("lookahead", 1), ("pre-attention", 2)]
)
def test_host_reads_per_layer_call(
    prefetch: str, reads: int, tiny_checkpoints: dict[str, Path], monkeypatch
) -> None:
    path = tiny_checkpoints["qwen3_moe"]
    model = load(path, slot_counts(path)["quarter"], "cpu", prefetch=prefetch)
    assert reads_per_layer_call(model, monkeypatch) == reads


def test_recording_adds_one_read(tiny_checkpoints: dict[str, Path], monkeypatch) -> None:
    path = tiny_checkpoints["qwen3_moe"]
    model = load(path, slot_counts(path)["quarter"], "cpu", record_trace=True, prefetch="none")
    assert reads_per_layer_call(model, monkeypatch) == 2.0  # the routing weights of the trace


@pytest.mark.gpu
@pytest.mark.parametrize("prefetch", ["none", "history", "lookahead", "pre-attention"])
def test_gpu_one_sync_per_layer_call(prefetch: str, tiny_checkpoints: dict[str, Path]) -> None:
    """torch.cuda.set_sync_debug_mode warns on every synchronizing CUDA op: inside MoE layer calls, one per
    call (the routing's device-to-host read), whatever the prefetch mode. Copy only: a call that computes
    experts on the host reads their tokens' rows to the host too (offload/runtime/host_compute.py)."""
    path = tiny_checkpoints["qwen3_moe"]
    model = load(path, slot_counts(path)["quarter"], "cuda", prefetch=prefetch, host_compute="off")
    runtime = runtime_of(model)
    decode_steps(model, "cuda", steps=1)
    original, counts = runtime.forward_layer, {"calls": 0, "syncs": 0}

    def forward(*args, **kwargs):
        counts["calls"] += 1
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return original(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                counts["syncs"] += sum("synchronizing" in str(w.message) for w in caught)

    runtime.forward_layer = forward  # type: ignore[method-assign]
    decode_steps(model, "cuda", steps=3)
    assert counts["calls"] > 0 and counts["syncs"] == counts["calls"], counts
