"""Host syncs per MoE layer call (docs/architecture.md, "Host syncs per MoE layer"): one device-to-host read in
the plain prefetch modes (the routing, with a lookahead router's ids riding along); two with pre-attention, which
reads its guess before the layer runs; one more when recording a trace; one more in a call with host experts on
CUDA (their rows and weights, in one transfer; on a CPU device nothing moves).

Counted on the CPU by a proxy, :class:`HostReadCounter`: the reads of tensor values the code path makes, and the
ops that would make the host wait for a CUDA device without a read of their own; and on a GPU by torch's own
sync debug mode."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import DynamicCache

from offload.hf.install import runtime_of
from offload.kernels.routing import read_tensors_to_host
from tests.conftest import HAS_CUDA
from tests.helpers import load, prompt, slot_counts

READS = (
    "cpu",
    "tolist",
    "item",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
)  # a tensor's values to the host
# torch.X and Tensor.X whose output size depends on the values, or that answer a Python bool: on CUDA each waits
# for the device.
DATA_DEPENDENT = (
    "nonzero",
    "argwhere",
    "unique",
    "unique_consecutive",
    "masked_select",
    "bincount",
    "equal",
    "allclose",
)
Predicate = Callable[[tuple, dict], bool]


def _has_mask(index: Any) -> bool:
    """A boolean (or uint8) tensor among an index's parts: indexing with it runs a nonzero, a sync on CUDA."""
    parts = index if isinstance(index, tuple | list) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype in (torch.bool, torch.uint8) for p in parts)


def _repeats_from_values(args: tuple, kwargs: dict) -> bool:
    """repeat_interleave with a tensor of repeats and no output_size: the output size is the repeats' sum."""
    repeats = args[1] if len(args) > 1 else kwargs.get("repeats", args[0] if args else None)
    return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None


class HostReadCounter:
    """While ``active``, counts what makes the host wait for a CUDA device: a tensor's values read to the host
    (``READS``), ops whose output size depends on the values or that answer a Python bool (``DATA_DEPENDENT``,
    one-argument ``torch.where``, ``repeat_interleave`` by a tensor), boolean-mask indexing and assignment, and
    ``torch.cuda.synchronize``, ``Stream.synchronize`` and ``Event.synchronize`` (without CUDA they are counted
    and skipped: there is nothing to wait for). A counted call made inside another (``Tensor.unique`` calls
    ``torch.unique``) counts once. Installed with ``monkeypatch``, removed by its ``undo``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.active = False
        self.reads = 0
        self._local = threading.local()  # per thread: how deep inside a counted call it is
        for name in READS:
            self._wrap(monkeypatch, torch.Tensor, name)
        for name in DATA_DEPENDENT:
            self._wrap(monkeypatch, torch, name)
            self._wrap(monkeypatch, torch.Tensor, name)
        self._wrap(monkeypatch, torch, "where", lambda args, kwargs: len(args) + len(kwargs) == 1)
        self._wrap(monkeypatch, torch, "repeat_interleave", _repeats_from_values)
        self._wrap(monkeypatch, torch.Tensor, "repeat_interleave", _repeats_from_values)
        self._wrap(monkeypatch, torch.Tensor, "__getitem__", lambda args, kwargs: _has_mask(args[1]))
        self._wrap(monkeypatch, torch.Tensor, "__setitem__", lambda args, kwargs: _has_mask(args[1]))
        for owner in (torch.cuda, torch.cuda.Stream, torch.cuda.Event):
            self._wrap(monkeypatch, owner, "synchronize", wait=True)

    def _wrap(
        self,
        monkeypatch: pytest.MonkeyPatch,
        owner: Any,
        name: str,
        counts: Predicate | None = None,
        wait: bool = False,
    ) -> None:
        original = getattr(owner, name)
        local = self._local

        def wrapper(*args, **kwargs):
            depth = getattr(local, "depth", 0)
            if self.active and depth == 0 and (counts is None or counts(args, kwargs)):
                self.reads += 1
            local.depth = depth + 1
            try:
                if wait and not torch.cuda.is_available():
                    return None
                return original(*args, **kwargs)
            finally:
                local.depth = depth

        monkeypatch.setattr(owner, name, wrapper)


def decode_steps(model: torch.nn.Module, device: str, steps: int = 3) -> None:
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(prompt(device), past_key_values=cache, use_cache=True)
        ids = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            ids = model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)


def reads_per_layer_call(model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch, steps: int = 3) -> float:
    """What :class:`HostReadCounter` counts inside MoE layer calls and the runtime's work before each decoder
    layer, per layer call, over ``steps`` decode steps (the prefill is not counted)."""
    runtime = runtime_of(model)
    counter = HostReadCounter(monkeypatch)  # counting nothing until a call is inside
    decode_steps(model, "cpu", steps=1)  # warm: the cache holds the prompt's experts
    calls = 0

    def inside(original, counts_call: bool):
        def call(*args, **kwargs):
            nonlocal calls
            counter.active, calls = True, calls + counts_call
            try:
                return original(*args, **kwargs)
            finally:
                counter.active = False

        return call

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        ids = model(prompt("cpu"), past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        monkeypatch.setattr(runtime, "forward_layer", inside(runtime.forward_layer, True))
        monkeypatch.setattr(runtime, "before_layer", inside(runtime.before_layer, False))
        for _ in range(steps):
            ids = model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    monkeypatch.undo()
    return counter.reads / calls


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


def test_host_compute_adds_no_read_on_a_cpu_device(tiny_checkpoints: dict[str, Path], monkeypatch) -> None:
    """On a CPU device the host workers take the tokens' rows where they lie: no read (on CUDA one, counted by
    test_gpu_syncs_per_layer_call and, for the packing it uses, test_one_read_brings_several_tensors)."""
    path = tiny_checkpoints["qwen3_moe"]
    model = load(path, slot_counts(path)["top_k"], "cpu", host_compute="always", prefetch="none")
    assert reads_per_layer_call(model, monkeypatch) == 1
    assert runtime_of(model).step.host is not None and runtime_of(model).step.host.calls > 0


def test_one_read_brings_several_tensors(monkeypatch) -> None:
    """read_tensors_to_host (a host-compute call's rows and weights on CUDA): one read, whatever the dtypes and
    odd sizes, each tensor back bitwise with its shape and dtype, each aligned as a tensor of its own."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(5, 7, generator=generator).to(torch.bfloat16)
    weights = torch.rand(5, generator=generator)
    ids = torch.randint(0, 9, (3,), generator=generator)
    flags = torch.rand(1, 3, generator=generator) > 0.5
    counter = HostReadCounter(monkeypatch)
    counter.active = True
    got = read_tensors_to_host(rows, weights, flags, ids)
    counter.active = False
    assert counter.reads == 1
    for want, have in zip((rows, weights, flags, ids), got, strict=True):
        assert have.dtype == want.dtype and have.shape == want.shape and torch.equal(have, want)
        assert have.data_ptr() % 64 == 0


def _assign_through_a_mask(x: torch.Tensor) -> None:
    y = x.clone()
    y[y > 0] = 0


def _stream_synchronize(x: torch.Tensor) -> None:
    torch.cuda.Stream.synchronize(torch.cuda.current_stream() if HAS_CUDA else None)


def _event_synchronize(x: torch.Tensor) -> None:
    torch.cuda.Event.synchronize(torch.cuda.Event() if HAS_CUDA else None)


# One op of each kind the proxy must catch, on a layer call's expert ids [T, k] (int64).
INJECTED: dict[str, Callable[[torch.Tensor], object]] = {
    "Tensor.cpu": lambda x: x.cpu(),
    "Tensor.item": lambda x: x[0, 0].item(),
    "bool": lambda x: bool((x >= 0).all()),
    "torch.nonzero": lambda x: torch.nonzero(x),
    "Tensor.nonzero": lambda x: x.nonzero(),
    "torch.argwhere": lambda x: torch.argwhere(x),
    "torch.where(condition)": lambda x: torch.where(x > 0),
    "torch.unique": lambda x: torch.unique(x),
    "Tensor.unique": lambda x: x.unique(),
    "torch.unique_consecutive": lambda x: torch.unique_consecutive(x),
    "torch.masked_select": lambda x: torch.masked_select(x, x > 0),
    "Tensor.masked_select": lambda x: x.masked_select(x > 0),
    "torch.bincount": lambda x: torch.bincount(x.reshape(-1)),
    "torch.repeat_interleave": lambda x: torch.repeat_interleave(x.reshape(-1)),
    "Tensor.repeat_interleave": lambda x: x.reshape(-1).repeat_interleave(x.reshape(-1)),
    "torch.equal": lambda x: torch.equal(x, x),
    "torch.allclose": lambda x: torch.allclose(x.float(), x.float()),
    "boolean mask": lambda x: x[x > 0],
    "boolean mask in a tuple": lambda x: x[x[:, 0] > 0, :],
    "boolean mask assignment": _assign_through_a_mask,
    "torch.cuda.synchronize": lambda x: torch.cuda.synchronize(),
    "Stream.synchronize": _stream_synchronize,
    "Event.synchronize": _event_synchronize,
}


@pytest.mark.parametrize("kind", sorted(INJECTED))
def test_the_proxy_counts_every_kind_of_sync(
    kind: str, tiny_checkpoints: dict[str, Path], monkeypatch
) -> None:
    """One op of ``kind`` added to the layer path (in the plan stage, on the call's expert ids) raises the count
    from 1 to 2 per layer call; the ops it must not count (integer indexing, slicing, repeat_interleave with an
    output size, three-argument where) leave it at 1."""
    path = tiny_checkpoints["qwen3_moe"]
    model = load(path, slot_counts(path)["quarter"], "cpu", prefetch="none")
    step = runtime_of(model).step
    plan, op = step.plan, INJECTED[kind]

    def plan_with_a_sync(layer, routed):
        x = routed.top_k_index
        op(x)
        return plan(layer, routed)

    def plan_without_one(layer, routed):
        x = routed.top_k_index
        flat = x.reshape(-1)
        _ = x[0], x[:, :1], flat[torch.arange(2)]
        torch.repeat_interleave(flat, torch.ones_like(flat), output_size=flat.numel())
        torch.where(x > 0, x, 0)
        return plan(layer, routed)

    step.plan = plan_without_one  # type: ignore[method-assign]
    assert reads_per_layer_call(model, monkeypatch) == 1, "counted an op that needs no read"
    step.plan = plan_with_a_sync  # type: ignore[method-assign]
    assert reads_per_layer_call(model, monkeypatch) == 2, f"{kind} was not counted"


# Options, and device-to-host syncs per MoE layer call; a call with host experts makes one more.
GPU_CASES = [
    pytest.param({"prefetch": "none"}, 1, id="none"),
    pytest.param({"prefetch": "history"}, 1, id="history"),
    pytest.param({"prefetch": "lookahead"}, 1, id="lookahead"),
    pytest.param({"prefetch": "pre-attention"}, 2, id="pre-attention"),
    pytest.param({"prefetch": "none", "record_trace": True}, 2, id="record"),
    pytest.param({"prefetch": "none", "host_compute": "always"}, 1, id="host-compute"),
]


@pytest.mark.gpu
@pytest.mark.parametrize(("options", "syncs"), GPU_CASES)
def test_gpu_syncs_per_layer_call(options: dict, syncs: int, tiny_checkpoints: dict[str, Path]) -> None:
    """torch.cuda.set_sync_debug_mode warns on every synchronizing CUDA op: inside MoE layer calls and the
    runtime's work before each decoder layer (pre-attention's read), as many per call as the table in
    docs/architecture.md says; with host compute "always" every call has host experts: one more each."""
    path = tiny_checkpoints["qwen3_moe"]
    model = load(path, slot_counts(path)["quarter"], "cuda", **{"host_compute": "off", **options})
    runtime = runtime_of(model)
    decode_steps(model, "cuda", steps=1)  # warm: kernels built, the host kernel picked (its probe syncs)
    counts = {"calls": 0, "syncs": 0, "host_calls": 0}

    def counting(original, counts_call: bool):
        def call(*args, **kwargs):
            counts["calls"] += counts_call
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    return original(*args, **kwargs)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                    counts["syncs"] += sum("synchronizing" in str(w.message) for w in caught)

        return call

    runtime.forward_layer = counting(runtime.forward_layer, True)  # type: ignore[method-assign]
    runtime.before_layer = counting(runtime.before_layer, False)  # type: ignore[method-assign]
    host = runtime.step.host
    if host is not None:
        submit = host.submit

        def counted_submit(*args, **kwargs):
            counts["host_calls"] += 1
            return submit(*args, **kwargs)

        host.submit = counted_submit  # type: ignore[method-assign]
    decode_steps(model, "cuda", steps=3)
    assert counts["calls"] > 0, counts
    assert counts["syncs"] == syncs * counts["calls"] + counts["host_calls"], counts
    if options.get("host_compute") == "always":  # nothing is admitted: every call has host experts
        assert counts["host_calls"] == counts["calls"], counts
