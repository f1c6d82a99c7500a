"""Layout, host store, slot pool and copy engines: every variant lands in one canonical format, byte-exact."""

from __future__ import annotations

import time

import pytest
import torch

from offload.memory.copy_engines import CudaCopyEngine, SyncCopyEngine, ThreadedCopyEngine, make_copy_engine
from offload.memory.host_store import HostExpertStore
from offload.memory.layout import ALIGN, ExpertLayout
from offload.memory.slot_pool import SlotPool
from tests.conftest import DEVICES

E, H, I = 3, 8, 5  # noqa: E741 - experts, hidden, intermediate (odd sizes: padding must be right)


def reference_fields(seed: int = 0) -> dict[str, torch.Tensor]:
    """Canonical per-expert tensors, [E, ...], with distinct values everywhere."""
    g = torch.Generator().manual_seed(seed)
    return {
        "gate": torch.randn(E, I, H, generator=g),
        "up": torch.randn(E, I, H, generator=g),
        "down": torch.randn(E, H, I, generator=g),
        "gate_bias": torch.randn(E, I, generator=g),
        "up_bias": torch.randn(E, I, generator=g),
        "down_bias": torch.randn(E, H, generator=g),
    }


def hf_tensors(
    ref: dict[str, torch.Tensor], has_gate: bool, concatenated: bool, transposed: bool, bias: bool
):
    """What a transformers experts module of that variant holds."""
    if has_gate and concatenated:
        gate_up = torch.cat((ref["gate"], ref["up"]), dim=1)  # [E, 2I, H]
        gate_up_bias = torch.cat((ref["gate_bias"], ref["up_bias"]), dim=1)
    elif has_gate:  # interleaved rows: gate0, up0, gate1, up1, ...
        gate_up = torch.stack((ref["gate"], ref["up"]), dim=2).reshape(E, 2 * I, H)
        gate_up_bias = torch.stack((ref["gate_bias"], ref["up_bias"]), dim=2).reshape(E, 2 * I)
    else:
        gate_up, gate_up_bias = ref["up"], ref["up_bias"]
    down = ref["down"]
    if transposed:
        gate_up, down = gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()
    first = "gate_up_proj" if has_gate else "up_proj"
    out = {first: gate_up, "down_proj": down}
    if bias:
        out[first + "_bias"] = gate_up_bias
        out["down_proj_bias"] = ref["down_bias"]
    return out


VARIANTS = [
    # has_gate, concatenated, transposed, bias
    (True, True, False, False),  # Mixtral, Qwen, OLMoE, DeepSeek
    (True, False, True, True),  # gpt-oss
    (True, True, True, True),  # openai privacy filter
    (False, True, False, False),  # Nemotron-H (no gate)
]


@pytest.mark.parametrize(("has_gate", "concatenated", "transposed", "bias"), VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_variant_packs_to_the_canonical_layout(has_gate, concatenated, transposed, bias, dtype) -> None:
    ref = reference_fields()
    layout = ExpertLayout(
        H, I, has_gate, bias, dtype, source_concatenated=concatenated, source_transposed=transposed
    )
    store = HostExpertStore(layout, num_layers=2, num_experts=E, pin=False)
    store.fill_layer(1, hf_tensors(ref, has_gate, concatenated, transposed, bias))
    for e in range(E):
        views = store.views(1, e)
        gate_up = torch.cat((ref["gate"][e], ref["up"][e])) if has_gate else ref["up"][e]
        assert torch.equal(views["gate_up"], gate_up.to(dtype))
        assert torch.equal(views["down"], ref["down"][e].to(dtype))
        if bias:
            gate_up_bias = (
                torch.cat((ref["gate_bias"][e], ref["up_bias"][e])) if has_gate else ref["up_bias"][e]
            )
            assert torch.equal(views["gate_up_bias"], gate_up_bias.to(dtype))
            assert torch.equal(views["down_bias"], ref["down_bias"][e].to(dtype))
        else:
            assert set(views) == {"gate_up", "down"}
    with pytest.raises(RuntimeError, match="not been loaded"):
        store.expert(0, 0)


def test_fields_are_aligned_and_padded() -> None:
    layout = ExpertLayout(H, I, True, True, torch.float16)
    assert all(f.offset % ALIGN == 0 for f in layout.fields)
    assert layout.nbytes % ALIGN == 0
    assert layout.payload_bytes == (2 * I * H + H * I + 2 * I + H) * 2 <= layout.nbytes


def test_wrong_shapes_are_refused() -> None:
    layout = ExpertLayout(H, I, True, False, torch.float32)
    bad = hf_tensors(reference_fields(), True, True, False, False)
    bad["down_proj"] = bad["down_proj"][:, :, :-1]
    with pytest.raises(ValueError, match="down"):
        layout.canonicalize(bad)


def _store_and_pool(device: str, slots: int = 4) -> tuple[HostExpertStore, SlotPool]:
    """One layer of E experts, and a pool whose slot table has an entry per expert, as the runtime sizes it
    ((layers, experts)): a copy's key ``layer * E + expert`` indexes it."""
    layout = ExpertLayout(H, I, True, True, torch.bfloat16)
    store = HostExpertStore(layout, num_layers=1, num_experts=E, pin=device == "cuda")
    store.fill_layer(0, hf_tensors(reference_fields(), True, True, False, True))
    return store, SlotPool(layout, slots, torch.device(device), table_shape=(1, E))


def test_sync_engine_copies_bytes_exactly() -> None:
    store, pool = _store_and_pool("cpu")
    engine = make_copy_engine(pool)
    assert isinstance(engine, SyncCopyEngine)
    engine.load([(3, store.expert(0, 2)), (0, store.expert(0, 1))])
    assert torch.equal(pool.slot(3), store.expert(0, 2))
    assert torch.equal(pool.slot(0), store.expert(0, 1))
    assert engine.bytes_copied == 2 * pool.layout.nbytes and engine.copies == 2
    # Typed pool views alias the raw bytes: a kernel indexing by slot sees the copied expert.
    assert torch.equal(pool.field("down")[3], store.views(0, 2)["down"])
    assert pool.field("gate_up").data_ptr() == pool.data.data_ptr()


@pytest.mark.parametrize("device", DEVICES)
def test_copy_engine_copies_in_the_background_and_orders_reuse(device: str) -> None:
    """The CUDA stream engine and its CPU twin, the threaded one: two copies with their slot-table keys, a read
    of both slots, then a third expert into slot 0 once the read released it. The table gets every key's slot
    in copy order (slot 0 for expert 2 last), beside the slots' bytes."""
    store, pool = _store_and_pool(device, slots=2)
    if device == "cuda":
        assert store.expert(0, 0).is_pinned()
    engine = make_copy_engine(pool, "auto" if device == "cuda" else "threaded")
    assert isinstance(engine, CudaCopyEngine if device == "cuda" else ThreadedCopyEngine)
    engine.load([(0, store.expert(0, 0)), (1, store.expert(0, 1))], keys=[0, 1])
    engine.acquire([0, 1])
    seen = pool.field("down")[:2].float().sum()  # compute (on CUDA the default stream), after the copies
    engine.release([0, 1])
    engine.load([(0, store.expert(0, 2))], keys=[2])  # waits for the read above before overwriting slot 0
    engine.acquire([0])
    engine.release([0])
    engine.synchronize()
    if device == "cuda":
        torch.cuda.synchronize()
    expected = store.views(0, 0)["down"].float().sum() + store.views(0, 1)["down"].float().sum()
    assert torch.allclose(seen.cpu(), expected, rtol=1e-3)
    assert torch.equal(pool.slot(0).cpu(), store.expert(0, 2))
    assert torch.equal(pool.slot(1).cpu(), store.expert(0, 1))
    assert pool.table.cpu().view(-1).tolist() == [0, 1, 0]  # written after each copy, in copy order
    assert engine.copies == 3 and engine.bytes_copied == 3 * pool.layout.nbytes
    assert engine.copy_seconds > 0
    engine.close()


def _big_slots(mib: int) -> tuple[SlotPool, torch.Tensor, torch.Tensor]:
    """A pool of one slot of ``mib`` MiB and two pinned sources of distinct bytes: copies take milliseconds."""
    layout = ExpertLayout(1024, mib * 256, False, False, torch.bfloat16)  # up_proj + down: mib MiB
    pool = SlotPool(layout, 1, torch.device("cuda"))
    old = torch.full((layout.nbytes,), 1, dtype=torch.uint8).pin_memory()
    new = torch.full((layout.nbytes,), 2, dtype=torch.uint8).pin_memory()
    return pool, old, new


@pytest.mark.gpu
def test_cuda_engine_holds_a_copy_back_until_the_reader_released_the_slot() -> None:
    """A reader acquires slot 0, sleeps on the compute stream, then reads it; the next copy into slot 0 is
    issued right after release: if the engine did not wait for the release event, the copy would land during
    the sleep and the read would see the new bytes. Checked by content."""
    pool, old, new = _big_slots(256)
    engine = make_copy_engine(pool)
    engine.load([(0, old)])
    engine.acquire([0])
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time before the read
    seen = pool.slot(0).clone()
    engine.release([0])
    engine.load([(0, new)])
    torch.cuda.synchronize()
    assert bool((seen == 1).all()), "the copy overwrote a slot a kernel was still to read"
    assert bool((pool.slot(0) == 2).all())


@pytest.mark.gpu
def test_cuda_engine_makes_compute_wait_for_the_copy() -> None:
    """acquire makes the compute stream wait for a large copy still in flight: the read sees all of it."""
    pool, old, new = _big_slots(256)
    engine = make_copy_engine(pool)
    engine.load([(0, old)])
    engine.acquire([0])
    engine.release([0])
    torch.cuda.synchronize()
    engine.load([(0, new)])
    assert not engine.landed(0)  # 256 MiB: still in flight right after it was issued
    engine.acquire([0])
    seen = pool.slot(0).clone()
    engine.release([0])
    torch.cuda.synchronize()
    assert bool((seen == 2).all())


def test_mapped_buffers_are_exact_page_aligned_and_zeroed() -> None:
    from offload.memory.host_memory import mapped_zeros

    buffer = mapped_zeros(3 * 4096 + 5)
    assert buffer.numel() == 3 * 4096 + 5 and buffer.dtype == torch.uint8
    assert buffer.data_ptr() % 4096 == 0
    assert not buffer.any()
    buffer[-1] = 7  # writable
    assert buffer[-1] == 7


@pytest.mark.gpu
def test_pinned_store_is_exact_size_and_copies_asynchronously() -> None:
    """torch's pin_memory rounds up to a power of two; the store's pinned layers must not."""
    layout = ExpertLayout(4096, 4100, True, False, torch.bfloat16)  # 3 experts of ~100 MB: not a power of two
    stats = torch.cuda.host_memory_stats()
    assert "allocated_bytes.current" in stats, sorted(stats)
    before = stats["allocated_bytes.current"]
    store = HostExpertStore(layout, num_layers=1, num_experts=3, pin=True)
    ref = {
        "gate_up_proj": torch.randn(3, 2 * 4100, 4096, dtype=torch.bfloat16),
        "down_proj": torch.randn(3, 4096, 4100, dtype=torch.bfloat16),
    }
    store.fill_layer(0, ref)
    buffer = store.expert(0, 0)
    assert buffer.is_pinned()
    grown = torch.cuda.host_memory_stats()["allocated_bytes.current"] - before
    assert grown == 0  # registered, not taken from torch's (rounding) caching host allocator
    pool = SlotPool(layout, 1, torch.device("cuda"))
    done = torch.cuda.Event()
    pool.slot(0).copy_(buffer, non_blocking=True)
    done.record()
    assert not done.query()  # ~100 MB from pinned memory: the host did not wait for it
    torch.cuda.synchronize()
    assert torch.equal(pool.field("down")[0].cpu(), ref["down_proj"][0])


class FakeCudart:
    """What the host store calls of CUDA's runtime, recording the calls; registration fails when told to."""

    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.registered: list[int] = []
        self.unregistered: list[int] = []

    def cudaHostRegister(self, ptr: int, size: int, flags: int) -> int:
        if self.fail:
            return 2  # cudaErrorMemoryAllocation
        self.registered.append(ptr)
        return 0

    def cudaHostUnregister(self, ptr: int) -> int:
        self.unregistered.append(ptr)
        return 0


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch):
    from offload.memory import host_memory

    consumed: list[int] = []
    monkeypatch.setattr(host_memory, "_consume_cuda_error", lambda: consumed.append(1))

    def install(fail: bool) -> FakeCudart:
        fake = FakeCudart(fail)
        monkeypatch.setattr(host_memory, "_cudart", lambda: fake)
        return fake

    install.consumed = consumed  # type: ignore[attr-defined]
    return install


def test_failed_pinning_leaves_the_store_pageable_with_one_warning(fake_cuda, caplog) -> None:
    fake = fake_cuda(fail=True)
    layout = ExpertLayout(H, I, True, True, torch.float32)
    store = HostExpertStore(layout, num_layers=3, num_experts=E, pin=True)
    with caplog.at_level("WARNING"):
        for layer in range(3):
            store.fill_layer(layer, hf_tensors(reference_fields(layer), True, True, False, True))
    warnings = [r for r in caplog.records if "page-locking host memory failed" in r.getMessage()]
    assert len(warnings) == 1 and not store.pin  # one warning; later layers do not try again
    assert fake_cuda.consumed == [1]  # the CUDA error the failure left was consumed at once
    assert torch.equal(store.views(2, 1)["down"], reference_fields(2)["down"][1])  # the bytes are all there
    store.release()
    assert fake.unregistered == []  # nothing was registered, so nothing is unregistered


def test_unpin_touches_only_what_was_registered(fake_cuda) -> None:
    from offload.memory.host_memory import host_buffer, unpin

    fake = fake_cuda(fail=False)
    layout = ExpertLayout(H, I, True, False, torch.float32)
    store = HostExpertStore(layout, num_layers=2, num_experts=E, pin=True)
    for layer in range(2):
        store.fill_layer(layer, hf_tensors(reference_fields(layer), True, True, False, False))
    assert len(fake.registered) == 2 and store.pin
    foreign = torch.zeros(4096, dtype=torch.uint8)  # memory this module never registered (torch's, say)
    unpin(foreign)
    assert fake.unregistered == []
    store.release()
    assert sorted(fake.unregistered) == sorted(fake.registered)
    store.release()  # twice: nothing more
    assert len(fake.unregistered) == 2
    buffer, pinned = host_buffer(100, pin=False)
    assert not pinned and buffer.numel() == 100


@pytest.mark.gpu
def test_a_failed_registration_does_not_poison_the_next_kernel() -> None:
    """Registering memory twice fails; the error it leaves must not surface at the next kernel launch."""
    from offload.memory.host_memory import _consume_cuda_error, host_buffer, unpin

    buffer, pinned = host_buffer(1 << 20, pin=True)
    assert pinned
    assert int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), 1 << 20, 1)) != 0  # already registered
    _consume_cuda_error()
    assert torch.ones(4, device="cuda").mul_(2).sum().item() == 8  # would raise with the stale error
    unpin(buffer)


# GPU clock cycles torch.cuda._sleep spins: at least 25 ms at the H100's and H200's 1.98 GHz boost clock;
# the bound leaves 5 ms for the host's work between the sleep's launch and the wait.
HELD_BACK_CYCLES = 50_000_000
HELD_BACK_SECONDS = 0.020


@pytest.mark.gpu
def test_stall_events_do_not_pile_up_at_a_full_hit_rate() -> None:
    """With every expert resident nothing is loaded; acquire's timing events must still be folded, and none
    lost: the first acquire waits for a copy held back on the copy stream, so the stall counts at least the
    hold, and never more than the test's wall time."""
    began = time.perf_counter()
    store, pool = _store_and_pool("cuda", slots=2)
    engine = make_copy_engine(pool)
    assert isinstance(engine, CudaCopyEngine)
    with torch.cuda.stream(engine.stream):
        torch.cuda._sleep(HELD_BACK_CYCLES)  # the copy below starts after it
    engine.load([(0, store.expert(0, 0))])
    engine.acquire([0])  # compute waits for the held-back copy: one long stall
    engine.release([0])
    torch.cuda.synchronize()  # the compute stream runs free again: the pairs below complete as they come
    for _ in range(1000):
        engine.acquire([0])
        engine.release([0])
    assert len(engine._stalls) <= 256
    stall = engine.stall_seconds
    assert HELD_BACK_SECONDS <= stall <= time.perf_counter() - began
