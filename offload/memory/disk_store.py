"""The disk store: every expert of a model on disk in the host store's canonical layout, written once from the
checkpoint and read by later loads. Two users: the compressed-store cache (a quantized store read back whole
at the next load instead of quantizing again) and the disk tier (experts read one at a time into host slots
while the model runs, :mod:`offload.memory.disk_reader`).

One folder per (checkpoint, layout), named by a hash of the checkpoint's identity (its files' paths, sizes
and modification times) and the layout. It holds one safetensors file per MoE layer, a single uint8 tensor
``[experts, stride]``, and ``store.json``, which lists the files and their sizes. Each expert is one row of
``stride`` bytes: its ``layout.nbytes`` bytes, zero-padded to a multiple of ``ALIGN`` (4 KiB), and the
tensor's data starts at a multiple of ``ALIGN`` in the file (the JSON header is padded with spaces, which the
safetensors format allows), so an expert can be read with direct I/O straight into an aligned host slot.

The folder is written under a temporary name and renamed into place when complete, so a reader sees a whole
store or none. A folder that does not check out (a file missing, truncated, with a header that does not
match, or data that does not start on a 4 KiB boundary; a ``store.json`` for another identity) is removed and
rebuilt, with one warning. The data bytes themselves are not hashed (that would cost as much as reading them
twice).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import uuid
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open

from offload.memory.layout import ExpertLayout
from offload.units import format_size

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when the packed bytes of a format, or the file layout, change (2: aligned rows)
TENSOR = "experts"
MANIFEST = "store.json"
ALIGN = 4096  # direct I/O's alignment: file offsets, lengths and memory addresses

State = Literal["read", "write", "off"]


def row_stride(layout: ExpertLayout) -> int:
    """Bytes of one expert's row on disk (and in a host slot the disk tier reads into): aligned for direct I/O."""
    return -(-layout.nbytes // ALIGN) * ALIGN


class DiskStore:
    """Read a stored model layer by layer or expert by expert, or write one as it is built (:meth:`open`
    decides which)."""

    def __init__(
        self,
        folder: Path,
        state: State,
        identity: dict[str, Any],
        rebuilt: bool,
        layout: ExpertLayout,
        num_experts: int,
    ) -> None:
        self.folder = folder
        self.state: State = state
        self.identity = identity
        self.rebuilt = rebuilt  # a damaged store was found and is being written again
        self.layout = layout
        self.num_experts = num_experts
        self.stride = row_stride(layout)
        self._partial: Path | None = None
        self._sizes: dict[str, int] = {}

    @classmethod
    def open(
        cls, root: Path, identity: dict[str, Any], layout: ExpertLayout, num_layers: int, num_experts: int
    ) -> DiskStore:
        """The store for ``identity`` under ``root``: ``read`` when a complete one checks out, else ``write``
        (``off`` when the disk cannot take it)."""
        identity = {**identity, "version": CACHE_VERSION, "nbytes": layout.nbytes, "layers": num_layers}
        identity["experts"] = num_experts
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]
        folder = root / key
        rebuilt = False
        stride = row_stride(layout)
        if folder.exists():
            problem = _check(folder, identity, (num_experts, stride), num_layers)
            if problem is None:
                return cls(folder, "read", identity, False, layout, num_experts)
            log.warning("disk store %s is unusable (%s): rebuilding it", folder, problem)
            shutil.rmtree(folder, ignore_errors=True)
            rebuilt = True
        need = num_layers * (num_experts * stride + ALIGN)
        try:
            root.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(root).free
        except OSError as exc:
            log.warning("not writing the disk store: cannot use %s (%s)", root, exc.strerror or exc)
            return cls(folder, "off", identity, rebuilt, layout, num_experts)
        if free < need * 1.05:
            log.warning(
                "not writing the disk store: it needs %s on disk, %s free in %s",
                format_size(need),
                format_size(free),
                root,
            )
            return cls(folder, "off", identity, rebuilt, layout, num_experts)
        return cls(folder, "write", identity, rebuilt, layout, num_experts)

    @property
    def nbytes(self) -> int:
        """Bytes of the experts' rows on disk, padding included."""
        return int(self.identity["layers"]) * self.num_experts * self.stride

    def path(self, layer: int) -> Path:
        return self.folder / file_name(layer)

    def read_layer(self, layer: int) -> torch.Tensor:
        """uint8 ``[experts, nbytes]``: the layer as the host store holds it (a view of the padded rows)."""
        with safe_open(self.path(layer), framework="pt") as handle:
            return handle.get_tensor(TENSOR)[:, : self.layout.nbytes]

    def write_layer(self, layer: int, buffer: torch.Tensor) -> None:
        """Write one layer, uint8 ``[experts, nbytes]``, into the store being built. A write that fails (a full
        disk) drops what was written, logs one warning and leaves the store ``off``."""
        if self.state != "write":
            return
        if self._partial is None:
            self._partial = self.folder.with_name(f".partial-{self.folder.name}-{uuid.uuid4().hex[:8]}")
            self._partial.mkdir(parents=True)
        try:
            name = file_name(layer)
            _write_rows(self._partial / name, buffer, self.stride)
            self._sizes[name] = (self._partial / name).stat().st_size
        except OSError as exc:  # a full disk mid-way: the caller goes on without the store
            log.warning("not writing the disk store: writing it failed (%s)", exc.strerror or exc)
            self.abort()

    def commit(self) -> None:
        """Make the written store visible, whole, under its final name; from then on it is read."""
        if self.state != "write" or self._partial is None:
            return
        manifest = {"identity": self.identity, "files": self._sizes}
        (self._partial / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        try:
            os.rename(self._partial, self.folder)
        except OSError:  # another process stored the same model first: keep theirs
            shutil.rmtree(self._partial, ignore_errors=True)
        self._partial = None
        self.state = "read"

    def abort(self) -> None:
        """Drop a half-written store (a failed load): nothing half-written is left behind."""
        if self._partial is not None:
            shutil.rmtree(self._partial, ignore_errors=True)
            self._partial = None
        if self.state == "write":
            self.state = "off"

    def describe(self, name: str, written: str) -> str:
        """For the load summary: where the store came from. ``name``: what the store is to the reader (the
        compressed-store cache, the disk tier); ``written``: what building it was."""
        if self.state == "read" and not self._sizes:
            return f"read from the {name} ({self.folder})"
        if self.state in ("read", "write"):
            again = " again (the old copy was damaged)" if self.rebuilt else ""
            return f"{written}, stored on disk{again} for the next load ({self.folder})"
        return f"{written}, not stored on disk (the disk could not take it: see the warning)"


def file_name(layer: int) -> str:
    return f"layer-{layer:04d}.safetensors"


def data_offset(path: Path) -> int:
    """Where a safetensors file's tensor data starts: after its 8-byte length and its JSON header."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
    return 8 + length


def _write_rows(path: Path, buffer: torch.Tensor, stride: int) -> None:
    """A safetensors file of one uint8 tensor ``[experts, stride]``: ``buffer``'s rows, zero-padded, the data
    starting at a multiple of ``ALIGN``."""
    experts, nbytes = buffer.shape
    header = {TENSOR: {"dtype": "U8", "shape": [experts, stride], "data_offsets": [0, experts * stride]}}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGN)  # whitespace after the JSON: the format allows it
    rows = buffer.contiguous().numpy()
    padding = bytes(stride - nbytes)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for row in rows:
            f.write(memoryview(row))
            f.write(padding)


def _check(folder: Path, identity: dict[str, Any], shape: tuple[int, int], num_layers: int) -> str | None:
    """Why the store in ``folder`` cannot be used, or None when it can."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        return f"{MANIFEST}: {exc.strerror if isinstance(exc, OSError) else 'not JSON'}"
    if not isinstance(manifest, dict) or manifest.get("identity") != identity:
        return f"{MANIFEST} is for another checkpoint or format"
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != {file_name(i) for i in range(num_layers)}:
        return f"{MANIFEST} does not list one file per layer"
    for name, size in sorted(files.items()):
        path = folder / name
        try:
            actual = path.stat().st_size
        except OSError:
            return f"{name} is missing"
        if actual != size:
            return f"{name} has {actual} bytes, {size} written"
        try:
            with safe_open(path, framework="pt") as handle:
                tensor = handle.get_slice(TENSOR)
                if tuple(tensor.get_shape()) != shape or tensor.get_dtype() != "U8":
                    return f"{name} holds {tensor.get_dtype()} {tensor.get_shape()}, not U8 {list(shape)}"
            if data_offset(path) % ALIGN:
                return f"{name}'s data does not start on a {ALIGN}-byte boundary"
        except (SafetensorError, OSError, KeyError, struct.error) as exc:
            return f"{name}: {str(exc).splitlines()[0]}"
    return None
