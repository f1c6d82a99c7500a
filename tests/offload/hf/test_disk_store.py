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
    assert "stored on disk" in offload.stats(first).store_source
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
    assert "stored on disk" in offload.stats(model).store_source  # not read from the group-64 entry
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
    assert "stored on disk" in offload.stats(model).store_source


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
    from offload.memory import disk_store

    full = shutil.disk_usage(user_cache_dir("stores"))._replace(free=1024)
    monkeypatch.setattr(disk_store.shutil, "disk_usage", lambda _: full)
    before = set(_entries())
    with caplog.at_level(logging.WARNING, logger="offload.memory.disk_store"):
        model = _load(checkpoint)
    warnings = [r.getMessage() for r in caplog.records if r.name == "offload.memory.disk_store"]
    assert len(warnings) == 1 and warnings[0].startswith("not writing the disk store: it needs")
    source = offload.stats(model).store_source
    assert (
        source == "quantized while loading, not stored on disk (the disk could not take it: see the warning)"
    )
    assert set(_entries()) == before


def _layout():
    from offload.memory.layout import ExpertLayout

    return ExpertLayout(24, 40, True, False, torch.float32)  # not a multiple of 4 KiB


def _written(tmp_path: Path, layers: int = 2, experts: int = 3):
    from offload.memory.disk_store import DiskStore

    layout = _layout()
    store = DiskStore.open(tmp_path / "stores", {"model": "m"}, layout, layers, experts)
    assert store.state == "write"
    data = [torch.randint(0, 256, (experts, layout.nbytes), dtype=torch.uint8) for _ in range(layers)]
    for layer, buffer in enumerate(data):
        store.write_layer(layer, buffer)
    store.commit()
    return store, data


def test_each_expert_is_one_aligned_row_for_direct_io(tmp_path: Path) -> None:
    """Data at a 4 KiB boundary, each row padded to 4 KiB multiples with zeros: an expert is one aligned read
    at data_offset + e * stride; the file is still plain safetensors."""
    import os

    from offload.memory.disk_store import ALIGN, DiskStore, data_offset

    store, data = _written(tmp_path)
    assert store.state == "read" and store.stride % ALIGN == 0
    assert store.stride - ALIGN < _layout().nbytes < store.stride
    again = DiskStore.open(tmp_path / "stores", {"model": "m"}, _layout(), 2, 3)
    assert again.state == "read" and again.folder == store.folder
    for layer, buffer in enumerate(data):
        path = store.path(layer)
        assert data_offset(path) % ALIGN == 0
        assert torch.equal(again.read_layer(layer), buffer)
        fd = os.open(path, os.O_RDONLY)
        try:
            for e in range(3):
                row = os.pread(fd, store.stride, data_offset(path) + e * store.stride)
                assert row[: _layout().nbytes] == buffer[e].numpy().tobytes()
                assert not any(row[_layout().nbytes :])
        finally:
            os.close(fd)


def test_a_store_whose_rows_are_not_aligned_is_rebuilt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A version-1 style file (safetensors' own writer: data not on a 4 KiB boundary) does not check out."""
    from safetensors.torch import save_file

    from offload.memory.disk_store import DiskStore

    store, _ = _written(tmp_path)
    path = store.path(0)
    rows = store.read_layer(0).clone()
    padded = torch.zeros((3, store.stride), dtype=torch.uint8)
    padded[:, : rows.shape[1]] = rows
    save_file({"experts": padded}, str(path))
    import json

    manifest = json.loads((store.folder / "store.json").read_text())
    manifest["files"][path.name] = path.stat().st_size
    (store.folder / "store.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="offload.memory.disk_store"):
        again = DiskStore.open(tmp_path / "stores", {"model": "m"}, _layout(), 2, 3)
    assert again.state == "write" and again.rebuilt
    assert "4096-byte boundary" in caplog.records[0].getMessage()
