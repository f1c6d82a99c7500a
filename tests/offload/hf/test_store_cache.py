"""The compressed-store cache: the first quantized load writes it, the next reads it (bitwise the same
store, no quantizing), and a damaged one is detected, rebuilt and reported in one warning."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

import offload
from offload.hf.install import runtime_of
from offload.user_cache import user_cache_dir
from tests.helpers import prompt


def _load(path: Path, **options: object) -> torch.nn.Module:
    return offload.from_pretrained(
        path, vram_budget="1GB", device="cpu", max_context=64, quantize="int4", progress=False, **options
    )


def _store(model: torch.nn.Module) -> list[torch.Tensor]:
    runtime = runtime_of(model)
    return [runtime.store.layer_bytes(i).clone() for i in range(runtime.survey.num_layers)]


def _entries() -> list[Path]:
    root = user_cache_dir("stores")
    return sorted(root.iterdir()) if root.is_dir() else []


@pytest.fixture
def checkpoint(tmp_path: Path, tiny_checkpoints: dict[str, Path]) -> Path:
    """A checkpoint of its own (its path is part of the cache key), so each test starts uncached."""
    copy = tmp_path / "qwen3_moe"
    copy.mkdir()
    for f in tiny_checkpoints["qwen3_moe"].iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    return copy


def test_second_load_reads_the_cache_and_computes_the_same(checkpoint: Path) -> None:
    before = set(_entries())  # other tests' quantized loads share the session's cache folder
    first = _load(checkpoint)
    assert "cached" in offload.stats(first).store_source
    added = set(_entries()) - before
    assert len(added) == 1 and not next(iter(added)).name.startswith(".")
    second = _load(checkpoint)
    assert offload.stats(second).store_source.startswith("read from the compressed-store cache")
    for a, b in zip(_store(first), _store(second), strict=True):
        assert torch.equal(a, b)
    ids = prompt("cpu")
    with torch.no_grad():
        assert torch.equal(first(ids).logits, second(ids).logits)


def test_another_format_or_group_is_another_cache_entry(checkpoint: Path) -> None:
    _load(checkpoint)
    before = set(_entries())
    model = _load(checkpoint, quantize_group=32)
    assert "cached" in offload.stats(model).store_source  # not read from the group-64 entry
    assert len(set(_entries()) - before) == 1


def test_a_truncated_cache_file_is_rebuilt_with_one_warning(
    checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = _load(checkpoint)
    folder = Path(offload.stats(first).store_source.rsplit("(", 1)[1].rstrip(")"))
    victim = folder / "layer-0001.safetensors"
    victim.write_bytes(victim.read_bytes()[:-100])
    with caplog.at_level(logging.WARNING, logger="offload"):
        second = _load(checkpoint)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unusable" in warnings[0].getMessage()
    assert "layer-0001.safetensors" in warnings[0].getMessage()
    assert "again" in offload.stats(second).store_source
    for a, b in zip(_store(first), _store(second), strict=True):
        assert torch.equal(a, b)
    third = _load(checkpoint)  # the rebuilt entry is whole again
    assert offload.stats(third).store_source.startswith("read from")


def test_a_changed_checkpoint_does_not_read_the_old_store(checkpoint: Path) -> None:
    _load(checkpoint)
    weights = checkpoint / "model.safetensors"
    weights.touch()  # a new modification time: another identity
    import os

    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    model = _load(checkpoint)
    assert "cached" in offload.stats(model).store_source


def test_store_cache_off_writes_nothing(checkpoint: Path) -> None:
    before = set(_entries())
    model = _load(checkpoint, store_cache=False)
    assert offload.stats(model).store_source == "quantized while loading (the store cache is off)"
    assert set(_entries()) == before


def test_a_failed_load_leaves_no_partial_store(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from offload.hf import load as load_module

    calls = {"n": 0}
    real = load_module.release_freed_host_memory

    def fail_on_second_layer() -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk pulled out")
        real()

    monkeypatch.setattr(load_module, "release_freed_host_memory", fail_on_second_layer)
    before = set(_entries())
    with pytest.raises(RuntimeError, match="disk pulled out"):
        _load(checkpoint)
    assert set(_entries()) == before


def test_a_disk_without_room_loads_uncached_with_one_warning(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from offload.memory import store_cache

    full = shutil.disk_usage(user_cache_dir("stores"))._replace(free=1024)
    monkeypatch.setattr(store_cache.shutil, "disk_usage", lambda _: full)
    before = set(_entries())
    with caplog.at_level(logging.WARNING, logger="offload.memory.store_cache"):
        model = _load(checkpoint)
    warnings = [r.getMessage() for r in caplog.records if r.name == "offload.memory.store_cache"]
    assert len(warnings) == 1 and warnings[0].startswith("not caching the compressed store: it needs")
    source = offload.stats(model).store_source
    assert source == "quantized while loading, not cached (the disk could not take it: see the warning)"
    assert set(_entries()) == before
