"""Importers for routing traces recorded by other tools, and :func:`load_trace`, which picks one by content.

Supported, besides the native format of :mod:`cache_policies.study.trace`:

- **JSONL decode traces** (as in sqliteai/warp): one JSON object per decode step,
  ``{"tok": 1, "layers": [[top-k expert ids], ... one list per MoE layer]}``; one token per step.
- **FLAME-MoE routing arrays** (``.npz``): ``encoder_topk_ids [layers, tokens, k]`` (one token per step,
  the default) or ``decoder_topk_ids [positions, layers, segments, k]`` (``part="decoder"``: one step per
  position, each with one token per segment, like a batch), with their ``*_topk_scores`` as weights and
  ``layers`` as the model layer numbers.

Neither foreign format records the number of experts or the expert size: by default the number of experts is
the largest id seen plus one (pass ``num_experts`` when the trace may not use the last expert), and the
expert size is unknown (pass ``expert_bytes`` to get bytes moved and simulated tokens/s).
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from cache_policies.study.trace import RoutingTrace, TraceError, from_arrays, is_int


def load_trace(
    path: str | os.PathLike[str],
    *,
    num_experts: int | None = None,
    expert_bytes: int | None = None,
    model: str | None = None,
    part: str = "encoder",
) -> RoutingTrace:
    """Read a native, JSONL or FLAME-MoE trace, recognized by its content; a clear TraceError otherwise.

    The keyword arguments fill in what a foreign format lacks (or override a native file's metadata).
    """
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: no such trace file")
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError as e:
        raise TraceError(f"{path}: cannot read ({e.strerror})") from None
    if head.startswith(b"PK"):  # a zip archive: .npz
        arrays = _read_npz(path)
        if "meta" in arrays:
            trace = from_arrays(arrays, str(path))
            return _override(trace, str(path), num_experts, expert_bytes, model)
        if "encoder_topk_ids" in arrays or "decoder_topk_ids" in arrays:
            return flame_from_arrays(
                arrays, str(path), part=part, num_experts=num_experts, expert_bytes=expert_bytes, model=model
            )
        raise TraceError(f"{path}: unrecognized .npz trace (arrays: {', '.join(sorted(arrays)) or 'none'})")
    if head.lstrip()[:1] == b"{" or path.suffix in (".jsonl", ".json"):
        return import_jsonl(path, num_experts=num_experts, expert_bytes=expert_bytes, model=model)
    raise TraceError(f"{path}: not a trace (expected a .npz archive or JSON lines)")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {name: z[name] for name in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise TraceError(f"{path}: not a readable .npz file ({e})") from None


def _override(
    trace: RoutingTrace, where: str, num_experts: int | None, expert_bytes: int | None, model: str | None
) -> RoutingTrace:
    if num_experts is None and expert_bytes is None and model is None:
        return trace
    try:
        return dataclasses.replace(
            trace,
            num_experts=trace.num_experts if num_experts is None else num_experts,
            model=trace.model if model is None else model,
            expert_bytes=trace.expert_bytes if expert_bytes is None else expert_bytes,
        )
    except TraceError as e:
        raise TraceError(f"{where}: {e}") from None


def _infer_experts(ids: np.ndarray, num_experts: int | None) -> int:
    return int(ids.max()) + 1 if num_experts is None else num_experts


# -- JSONL ----------------------------------------------------------------------------------------------
def import_jsonl(
    path: str | os.PathLike[str],
    *,
    num_experts: int | None = None,
    expert_bytes: int | None = None,
    model: str | None = None,
) -> RoutingTrace:
    """One decode step per line: ``{"layers": [[ids of layer 0], [ids of layer 1], ...]}``."""
    path = Path(path)
    rows: list[list[list[int]]] = []
    try:
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    rows.append(_jsonl_step(line, f"{path}:{number}"))
    except (OSError, UnicodeDecodeError) as e:
        raise TraceError(f"{path}: cannot read as UTF-8 text ({e})") from None
    if not rows:
        raise TraceError(f"{path}: no steps")
    layers, top_k = len(rows[0]), len(rows[0][0])
    for number, row in enumerate(rows, 1):
        if len(row) != layers:
            raise TraceError(f"{path}: step {number} has {len(row)} layers, the first step has {layers}")
        for layer, chosen in enumerate(row):
            if len(chosen) != top_k:
                raise TraceError(
                    f"{path}: step {number}, layer {layer} has {len(chosen)} experts, the first step has {top_k}"
                )
    ids = np.asarray(rows, dtype=np.int64)  # [steps (= tokens), layers, top_k]
    try:
        return RoutingTrace(
            ids,
            np.arange(len(rows) + 1, dtype=np.int64),
            _infer_experts(ids, num_experts),
            model=path.stem if model is None else model,
            expert_bytes=expert_bytes,
            source=f"imported from JSONL {path.name}",
        )
    except TraceError as e:
        raise TraceError(f"{path}: {e}") from None


def _jsonl_step(line: str, where: str) -> list[list[int]]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise TraceError(f"{where}: not valid JSON ({e.msg})") from None
    layers = obj.get("layers") if isinstance(obj, dict) else None
    if not isinstance(layers, list) or not layers:
        raise TraceError(f"{where}: expected an object with a non-empty 'layers' list")
    for ids in layers:
        if not isinstance(ids, list) or not ids or not all(is_int(x) for x in ids):
            raise TraceError(f"{where}: each layer must be a non-empty list of integer expert ids")
    return layers


# -- FLAME-MoE npz --------------------------------------------------------------------------------------
def flame_from_arrays(
    arrays: dict[str, np.ndarray],
    where: str,
    *,
    part: str = "encoder",
    num_experts: int | None = None,
    expert_bytes: int | None = None,
    model: str | None = None,
) -> RoutingTrace:
    if part not in ("encoder", "decoder"):
        raise TraceError(f"{where}: part must be 'encoder' or 'decoder', got {part!r}")
    ids_name, scores_name = f"{part}_topk_ids", f"{part}_topk_scores"
    if ids_name not in arrays:
        raise TraceError(f"{where}: no {ids_name!r} array")
    raw = arrays[ids_name]
    scores = arrays.get(scores_name)
    want = 3 if part == "encoder" else 4
    if raw.ndim != want or raw.dtype.kind not in "iu":
        layout = "[layers, tokens, k]" if part == "encoder" else "[positions, layers, segments, k]"
        raise TraceError(f"{where}: {ids_name} must be an integer array {layout}, got shape {raw.shape}")
    if scores is not None and scores.shape != raw.shape:
        raise TraceError(f"{where}: {scores_name} has shape {scores.shape}, {ids_name} has {raw.shape}")
    if part == "encoder":  # [L, T, k] -> [T, L, k]; one token per step
        ids = raw.transpose(1, 0, 2)
        weights = None if scores is None else scores.transpose(1, 0, 2)
        offsets = np.arange(ids.shape[0] + 1, dtype=np.int64)
    else:  # [P, L, S, k] -> [P * S, L, k]; position p is one step of S tokens
        positions, layers, segments, k = raw.shape
        ids = raw.transpose(0, 2, 1, 3).reshape(positions * segments, layers, k)
        weights = None if scores is None else scores.transpose(0, 2, 1, 3).reshape(ids.shape)
        offsets = np.arange(positions + 1, dtype=np.int64) * segments
    layer_numbers = arrays.get("layers")
    layer_ids = None
    if layer_numbers is not None:
        if layer_numbers.ndim != 1 or layer_numbers.dtype.kind not in "iu":
            raise TraceError(f"{where}: 'layers' must be a 1-D integer array of layer numbers")
        layer_ids = tuple(int(x) for x in layer_numbers)
    if ids.size == 0:
        raise TraceError(f"{where}: {ids_name} is empty")
    try:
        return RoutingTrace(
            np.ascontiguousarray(ids),
            offsets,
            _infer_experts(ids, num_experts),
            model=Path(where).stem if model is None else model,
            expert_bytes=expert_bytes,
            weights=None if weights is None else np.ascontiguousarray(weights, dtype=np.float32),
            layer_ids=layer_ids,
            source=f"imported from FLAME-MoE arrays {Path(where).name} ({part})",
        )
    except TraceError as e:
        raise TraceError(f"{where}: {e}") from None
