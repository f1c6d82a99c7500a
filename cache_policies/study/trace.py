"""Routing traces: which experts every token chose in every MoE layer, and the native file format.

A trace is a sequence of *steps* (one forward call of the model: a prefill step covers many tokens, a decode
step one). Every token of a step passes every MoE layer and picks ``top_k`` experts there. In memory::

    ids           int16/int32 [tokens, layers, top_k]   chosen experts of every token, in router rank order
                                                        where the source recorded it (ascending otherwise)
    step_offsets  int64 [steps + 1]                     step s covers tokens step_offsets[s]:step_offsets[s+1]
    weights       float32 [tokens, layers, top_k]       router weights of the chosen experts (optional)

plus metadata: model name, number of experts, expert bytes (for bytes moved and the timing model), the model
layer number of each trace layer, and a free-text source. ``layers`` and ``top_k`` are the shape of ``ids``.

On disk (``.npz``, written with numpy, read with ``allow_pickle=False``; docs/traces.md has the details)::

    meta          0-d unicode string: JSON {"format": "moe-offload-trace", "version": 1, "model", "num_layers",
                  "num_experts", "top_k", "expert_bytes", "layer_ids", "source"}
    ids, step_offsets, weights (if present)

Every trace is validated when it is built, whatever built it (a file, an importer, the runtime's recorder),
so the simulator can trust it. A malformed or inconsistent one raises :class:`TraceError` with one line
that says what is wrong and where.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "moe-offload-trace"
VERSION = 1


class TraceError(ValueError):
    """A trace file or array is malformed or inconsistent (the CLI turns this into exit code 2)."""


@dataclass(frozen=True, eq=False)
class RoutingTrace:
    ids: np.ndarray  # int [tokens, layers, top_k]
    step_offsets: np.ndarray  # int64 [steps + 1]
    num_experts: int
    model: str = ""
    expert_bytes: int | None = None  # bytes of one expert's weights; None: unknown
    weights: np.ndarray | None = None  # float32 [tokens, layers, top_k]
    layer_ids: tuple[int, ...] | None = None  # model layer number of each trace layer; None: 0..layers-1
    source: str = ""  # where the trace came from (free text)

    def __post_init__(self) -> None:
        _validate(self)

    # -- shape ---------------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return int(self.ids.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.ids.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.ids.shape[2])

    @property
    def num_steps(self) -> int:
        return len(self.step_offsets) - 1

    def tokens_per_step(self) -> np.ndarray:  # int64 [steps]
        return np.diff(self.step_offsets)

    def step_ids(self, step: int) -> np.ndarray:  # [tokens of the step, layers, top_k]
        return self.ids[self.step_offsets[step] : self.step_offsets[step + 1]]

    def describe(self) -> str:
        steps, tokens = self.num_steps, self.num_tokens
        return (
            f"{self.model or 'unnamed model'}: {steps} steps, {tokens} tokens, {self.num_layers} layers, "
            f"{self.num_experts} experts, top-{self.top_k}"
        )

    # -- construction --------------------------------------------------------------------------------
    @classmethod
    def from_steps(
        cls,
        steps: list[np.ndarray],
        num_experts: int,
        weights: list[np.ndarray] | None = None,
        **meta: Any,
    ) -> RoutingTrace:
        """Build from one ``[tokens, layers, top_k]`` id array per step (and optionally weights alike)."""
        if not steps:
            raise TraceError("a trace needs at least one step")
        arrays = [np.asarray(s) for s in steps]
        if any(a.ndim != 3 for a in arrays):
            raise TraceError("every step must be a [tokens, layers, top_k] array")
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([a.shape[0] for a in arrays])
        if len({a.shape[1:] for a in arrays}) > 1:
            raise TraceError(f"steps disagree on [layers, top_k]: {sorted({a.shape[1:] for a in arrays})}")
        w = None if weights is None else np.concatenate([np.asarray(x, dtype=np.float32) for x in weights])
        return cls(np.concatenate(arrays), offsets, num_experts, weights=w, **meta)

    def slice_steps(self, start: int, stop: int) -> RoutingTrace:
        """Steps ``start:stop`` as a trace of their own (e.g. a profiling part and an evaluation part)."""
        if not 0 <= start < stop <= self.num_steps:
            raise TraceError(f"step range {start}:{stop} is not inside the {self.num_steps} steps")
        first, last = int(self.step_offsets[start]), int(self.step_offsets[stop])
        return dataclasses.replace(
            self,
            ids=self.ids[first:last],
            step_offsets=self.step_offsets[start : stop + 1] - first,
            weights=None if self.weights is None else self.weights[first:last],
            source=f"{self.source}; steps {start}:{stop}".lstrip("; "),
        )

    # -- files ---------------------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "expert_bytes": self.expert_bytes,
            "layer_ids": None if self.layer_ids is None else list(self.layer_ids),
            "source": self.source,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the native ``.npz`` format; the file appears whole or not at all."""
        path = Path(path)
        arrays: dict[str, np.ndarray] = {
            "meta": np.array(json.dumps(self.meta())),
            "ids": self.ids.astype(_id_dtype(self.num_experts), copy=False),
            "step_offsets": self.step_offsets.astype(np.int64, copy=False),
        }
        if self.weights is not None:
            arrays["weights"] = self.weights.astype(np.float32, copy=False)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez_compressed(f, **arrays)  # type: ignore[arg-type]  # numpy stubs: **kwds vs allow_pickle
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


def _id_dtype(num_experts: int) -> np.dtype[Any]:
    return np.dtype(np.int16 if num_experts <= np.iinfo(np.int16).max else np.int32)


def from_arrays(arrays: dict[str, np.ndarray], where: str = "trace") -> RoutingTrace:
    """Build a trace from the arrays of a native file, checking the metadata against them."""
    for name in ("meta", "ids", "step_offsets"):
        if name not in arrays:
            raise TraceError(f"{where}: missing array {name!r} (has: {', '.join(sorted(arrays)) or 'none'})")
    meta_array = arrays["meta"]
    if meta_array.ndim != 0 or meta_array.dtype.kind != "U":
        raise TraceError(f"{where}: 'meta' must be a JSON string")
    try:
        meta = json.loads(str(meta_array))
    except json.JSONDecodeError as e:
        raise TraceError(f"{where}: 'meta' is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise TraceError(f"{where}: not a {FORMAT} file (meta 'format' is {_get(meta, 'format')!r})")
    if meta.get("version") != VERSION:
        raise TraceError(f"{where}: unsupported trace version {meta.get('version')!r} (this reads {VERSION})")
    ids = arrays["ids"]
    for field in ("num_layers", "top_k", "num_experts"):
        if not is_int(meta.get(field)):
            raise TraceError(f"{where}: meta {field!r} must be an integer, got {meta.get(field)!r}")
    if ids.ndim == 3 and meta["num_layers"] != ids.shape[1]:
        raise TraceError(f"{where}: meta says {meta['num_layers']} layers but ids has {ids.shape[1]}")
    if ids.ndim == 3 and meta["top_k"] != ids.shape[2]:
        raise TraceError(f"{where}: meta says top_k={meta['top_k']} but ids has {ids.shape[2]} per token")
    layer_ids = meta.get("layer_ids")
    if layer_ids is not None and (not isinstance(layer_ids, list) or not all(map(is_int, layer_ids))):
        raise TraceError(f"{where}: meta 'layer_ids' must be a list of integers")
    for field in ("model", "source"):
        if not isinstance(meta.get(field, ""), str):
            raise TraceError(f"{where}: meta {field!r} must be a string")
    try:
        return RoutingTrace(
            ids,
            arrays["step_offsets"],
            meta["num_experts"],
            model=meta.get("model", ""),
            expert_bytes=meta.get("expert_bytes"),
            weights=arrays.get("weights"),
            layer_ids=None if layer_ids is None else tuple(layer_ids),
            source=meta.get("source", ""),
        )
    except TraceError as e:
        raise TraceError(f"{where}: {e}") from None


def _get(meta: Any, key: str) -> Any:
    return meta.get(key) if isinstance(meta, dict) else None


def is_int(x: Any) -> bool:
    """A JSON integer: an int that is not a bool."""
    return isinstance(x, int) and not isinstance(x, bool)


# -- validation -------------------------------------------------------------------------------------------
def _validate(t: RoutingTrace) -> None:
    if not is_int(t.num_experts) or t.num_experts < 1:
        raise TraceError(f"num_experts must be a positive integer, got {t.num_experts!r}")
    if t.expert_bytes is not None and (not is_int(t.expert_bytes) or t.expert_bytes < 1):
        raise TraceError(f"expert_bytes must be a positive integer or unknown, got {t.expert_bytes!r}")
    ids = t.ids
    if not isinstance(ids, np.ndarray) or ids.ndim != 3:
        raise TraceError(f"ids must be a [tokens, layers, top_k] array, got shape {np.shape(ids)}")
    if ids.dtype.kind not in "iu":
        raise TraceError(f"ids must be integers, got dtype {ids.dtype}")
    tokens, layers, top_k = ids.shape
    if tokens < 1 or layers < 1 or top_k < 1:
        raise TraceError(
            f"ids must have at least one token, layer and expert per token, got shape {ids.shape}"
        )
    _validate_offsets(t.step_offsets, tokens)
    bad = np.argwhere((ids < 0) | (ids >= t.num_experts))
    if len(bad):
        token, layer, _ = bad[0]
        step = _step_of(t.step_offsets, token)
        raise TraceError(
            f"expert id {ids[tuple(bad[0])]} out of range [0, {t.num_experts}) at step {step}, "
            f"token {token}, layer {layer}"
        )
    ordered = np.sort(ids, axis=2)
    dup = np.argwhere(ordered[:, :, 1:] == ordered[:, :, :-1])
    if len(dup):
        token, layer, _ = dup[0]
        step = _step_of(t.step_offsets, token)
        raise TraceError(
            f"duplicate expert in one token's top-k at step {step}, token {token}, layer {layer}: "
            f"{ids[token, layer].tolist()}"
        )
    if t.weights is not None:
        w = t.weights
        if not isinstance(w, np.ndarray) or w.shape != ids.shape:
            raise TraceError(f"weights must have the shape of ids {ids.shape}, got {np.shape(w)}")
        if w.dtype.kind != "f" or not np.all(np.isfinite(w)):
            raise TraceError("weights must be finite floats")
    if t.layer_ids is not None:
        if len(t.layer_ids) != layers:
            raise TraceError(f"layer_ids has {len(t.layer_ids)} entries for {layers} layers")
        if len(set(t.layer_ids)) != layers:
            raise TraceError(f"layer_ids must be distinct, got {list(t.layer_ids)}")
    if not isinstance(t.model, str) or not isinstance(t.source, str):
        raise TraceError("model and source must be strings")


def _validate_offsets(offsets: np.ndarray, tokens: int) -> None:
    if not isinstance(offsets, np.ndarray) or offsets.ndim != 1 or offsets.dtype.kind not in "iu":
        raise TraceError(f"step_offsets must be a 1-D integer array, got shape {np.shape(offsets)}")
    if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != tokens:
        raise TraceError(f"step_offsets must run from 0 to the {tokens} tokens, with at least one step")
    empty = np.flatnonzero(np.diff(offsets) <= 0)
    if len(empty):
        raise TraceError(f"step {empty[0]} has no tokens (step_offsets must increase strictly)")


def _step_of(offsets: np.ndarray, token: int) -> int:
    return int(np.searchsorted(offsets, token, side="right") - 1)
