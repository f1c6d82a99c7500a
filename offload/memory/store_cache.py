"""The compressed-store cache: a quantized host store kept on disk, so the next load reads it instead of
quantizing the checkpoint again.

One folder per (checkpoint, format), named by a hash of the checkpoint's identity (its files' paths, sizes
and modification times) and the layout. It holds one safetensors file per MoE layer (a single uint8 tensor
``[experts, nbytes]``: the host store's bytes as they are) and ``store.json``, which lists the files and
their sizes. The folder is written under a temporary name and renamed into place when complete, so a reader
sees a whole store or none. A folder that does not check out (a file missing, truncated, or with a header
that does not match; a ``store.json`` for another identity) is removed and rebuilt, with one warning. The
data bytes themselves are not hashed (that would cost as much as reading them twice).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from offload.memory.layout import ExpertLayout
from offload.units import format_size

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the packed bytes of a format change
TENSOR = "experts"
MANIFEST = "store.json"

State = Literal["read", "write", "off"]


class StoreCache:
    """Read a cached store layer by layer, or write one as it is built (:meth:`open` decides which)."""

    def __init__(self, folder: Path, state: State, identity: dict[str, Any], rebuilt: bool) -> None:
        self.folder = folder
        self.state: State = state
        self.identity = identity
        self.rebuilt = rebuilt  # a damaged cache was found and is being written again
        self._partial: Path | None = None
        self._sizes: dict[str, int] = {}

    @classmethod
    def open(
        cls, root: Path, identity: dict[str, Any], layout: ExpertLayout, num_layers: int, num_experts: int
    ) -> StoreCache:
        """The cache entry for ``identity`` under ``root``: ``read`` when a complete one checks out, else
        ``write`` (``off`` when the disk cannot take it)."""
        identity = {**identity, "version": CACHE_VERSION, "nbytes": layout.nbytes, "layers": num_layers}
        identity["experts"] = num_experts
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]
        folder = root / key
        rebuilt = False
        if folder.exists():
            problem = _check(folder, identity, (num_experts, layout.nbytes), num_layers)
            if problem is None:
                return cls(folder, "read", identity, rebuilt=False)
            log.warning("compressed-store cache %s is unusable (%s): rebuilding it", folder, problem)
            shutil.rmtree(folder, ignore_errors=True)
            rebuilt = True
        need = num_layers * num_experts * layout.nbytes
        try:
            root.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(root).free
        except OSError as exc:
            log.warning("not caching the compressed store: cannot use %s (%s)", root, exc.strerror or exc)
            return cls(folder, "off", identity, rebuilt)
        if free < need * 1.05:
            log.warning(
                "not caching the compressed store: it needs %s on disk, %s free in %s",
                format_size(need),
                format_size(free),
                root,
            )
            return cls(folder, "off", identity, rebuilt)
        return cls(folder, "write", identity, rebuilt)

    def read_layer(self, layer: int) -> torch.Tensor:
        """uint8 ``[experts, nbytes]``: the layer as the host store holds it."""
        with safe_open(self.folder / _file_name(layer), framework="pt") as handle:
            return handle.get_tensor(TENSOR)

    def write_layer(self, layer: int, buffer: torch.Tensor) -> None:
        if self.state != "write":
            return
        if self._partial is None:
            self._partial = self.folder.with_name(f".partial-{self.folder.name}-{uuid.uuid4().hex[:8]}")
            self._partial.mkdir(parents=True)
        try:
            name = _file_name(layer)
            save_file({TENSOR: buffer.contiguous()}, str(self._partial / name))
            self._sizes[name] = (self._partial / name).stat().st_size
        except OSError as exc:  # a full disk mid-way: the load goes on without the cache
            log.warning("not caching the compressed store: writing it failed (%s)", exc.strerror or exc)
            self.abort()

    def commit(self) -> None:
        """Make the written store visible, whole, under its final name."""
        if self.state != "write" or self._partial is None:
            return
        manifest = {"identity": self.identity, "files": self._sizes}
        (self._partial / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        try:
            os.rename(self._partial, self.folder)
        except OSError:  # another process cached the same store first: keep theirs
            shutil.rmtree(self._partial, ignore_errors=True)
        self._partial = None

    def abort(self) -> None:
        """Drop a half-written store (a failed load): nothing half-written is left behind."""
        if self._partial is not None:
            shutil.rmtree(self._partial, ignore_errors=True)
            self._partial = None
        if self.state == "write":
            self.state = "off"

    def describe(self) -> str:
        """For the load summary: where the store came from."""
        if self.state == "read":
            return f"read from the compressed-store cache ({self.folder})"
        if self.state == "write":
            again = " again (the old copy was damaged)" if self.rebuilt else ""
            return f"quantized while loading, cached{again} for the next load ({self.folder})"
        return "quantized while loading, not cached (the disk could not take it: see the warning)"


def _file_name(layer: int) -> str:
    return f"layer-{layer:04d}.safetensors"


def _check(folder: Path, identity: dict[str, Any], shape: tuple[int, int], num_layers: int) -> str | None:
    """Why the cached store in ``folder`` cannot be used, or None when it can."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        return f"{MANIFEST}: {exc.strerror if isinstance(exc, OSError) else 'not JSON'}"
    if not isinstance(manifest, dict) or manifest.get("identity") != identity:
        return f"{MANIFEST} is for another checkpoint or format"
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != {_file_name(i) for i in range(num_layers)}:
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
        except (SafetensorError, OSError, KeyError) as exc:
            return f"{name}: {str(exc).splitlines()[0]}"
    return None
