"""Routing traces: the native format round trip, the importers, and a clear error for every malformed input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cache_policies import RoutingTrace, TraceError, load_trace
from cache_policies.study.trace import FORMAT, from_arrays
from tests.helpers import TRACES

OLMOE = TRACES / "olmoe-1b-7b_decode_299.jsonl"
FLAME = TRACES / "flame-moe-290m_routing.npz"


def small_trace(**overrides: Any) -> RoutingTrace:
    """Three steps (a 3-token prefill, then two decode steps) over 2 layers, 8 experts, top-2."""
    ids = np.array(
        [
            [[0, 1], [2, 3]],
            [[1, 4], [3, 5]],
            [[7, 0], [6, 2]],
            [[2, 1], [0, 7]],
            [[5, 6], [4, 1]],
        ],
        dtype=np.int64,
    )
    fields: dict[str, Any] = {
        "ids": ids,
        "step_offsets": np.array([0, 3, 4, 5]),
        "num_experts": 8,
        "model": "tiny",
        "expert_bytes": 1000,
        "weights": np.linspace(0.1, 0.9, ids.size, dtype=np.float32).reshape(ids.shape),
        "layer_ids": (1, 3),
        "source": "hand-made",
    }
    fields.update(overrides)
    return RoutingTrace(**fields)


# -- the native format --------------------------------------------------------------------------------------
def test_round_trip_keeps_everything(tmp_path: Path) -> None:
    trace = small_trace()
    path = trace.save(tmp_path / "t.npz")
    back = load_trace(path)
    assert np.array_equal(back.ids, trace.ids) and back.ids.dtype == np.int16
    assert np.array_equal(back.step_offsets, trace.step_offsets)
    assert back.weights is not None and trace.weights is not None
    assert np.array_equal(back.weights, trace.weights)
    assert (back.model, back.num_experts, back.expert_bytes, back.layer_ids, back.source) == (
        "tiny",
        8,
        1000,
        (1, 3),
        "hand-made",
    )
    assert (back.num_steps, back.num_tokens, back.num_layers, back.top_k) == (3, 5, 2, 2)
    assert back.tokens_per_step().tolist() == [3, 1, 1]
    assert back.step_ids(0).shape == (3, 2, 2)


def test_round_trip_without_optional_fields(tmp_path: Path) -> None:
    trace = small_trace(weights=None, layer_ids=None, expert_bytes=None, model="", source="")
    back = load_trace(trace.save(tmp_path / "t.npz"))
    assert back.weights is None and back.layer_ids is None and back.expert_bytes is None


def test_native_file_is_plain_npz_with_json_meta(tmp_path: Path) -> None:
    path = small_trace().save(tmp_path / "t.npz")
    with np.load(path, allow_pickle=False) as z:
        assert set(z.files) == {"meta", "ids", "step_offsets", "weights"}
        meta = json.loads(str(z["meta"]))
    assert meta["format"] == FORMAT and meta["version"] == 1
    assert (meta["num_layers"], meta["num_experts"], meta["top_k"]) == (2, 8, 2)


def test_loader_recognizes_content_not_extension(tmp_path: Path) -> None:
    native = small_trace().save(tmp_path / "trace.bin")
    assert load_trace(native).model == "tiny"
    jsonl = tmp_path / "decode.txt"
    jsonl.write_text('{"tok": 1, "layers": [[0, 3], [1, 2]]}\n{"tok": 2, "layers": [[3, 4], [1, 0]]}\n')
    assert load_trace(jsonl).num_steps == 2


def test_from_steps_builds_offsets() -> None:
    a = np.zeros((2, 1, 1), dtype=np.int64)
    b = np.ones((1, 1, 1), dtype=np.int64)
    trace = RoutingTrace.from_steps([a, b], num_experts=2)
    assert trace.step_offsets.tolist() == [0, 2, 3]


def test_slice_steps() -> None:
    trace = small_trace()
    part = trace.slice_steps(1, 3)
    assert part.step_offsets.tolist() == [0, 1, 2]
    assert part.ids.tolist() == trace.ids[3:5].tolist()
    assert part.weights is not None and part.weights.shape == (2, 2, 2)
    assert trace.slice_steps(0, 1).num_tokens == 3
    for bad in ((2, 2), (-1, 2), (0, 4)):
        with pytest.raises(TraceError, match="step range"):
            trace.slice_steps(*bad)


def test_save_overwrites_whole(tmp_path: Path) -> None:
    path = tmp_path / "t.npz"
    small_trace().save(path)
    small_trace(model="second").save(path)
    assert load_trace(path).model == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["t.npz"]  # no temporary file left behind


# -- importers ----------------------------------------------------------------------------------------------
def test_import_olmoe_jsonl() -> None:
    trace = load_trace(OLMOE)
    assert (trace.num_steps, trace.num_tokens, trace.num_layers, trace.top_k, trace.num_experts) == (
        299,
        299,
        16,
        8,
        64,
    )
    first = json.loads(OLMOE.read_text().splitlines()[0])["layers"]
    assert trace.ids[0].tolist() == first
    assert trace.weights is None and trace.expert_bytes is None


def test_import_flame_encoder_and_decoder() -> None:
    trace = load_trace(FLAME)
    with np.load(FLAME, allow_pickle=False) as z:
        raw, scores, layers = z["encoder_topk_ids"], z["encoder_topk_scores"], z["layers"]
        dec = z["decoder_topk_ids"]
    assert (trace.num_steps, trace.num_layers, trace.top_k, trace.num_experts) == (2048, 8, 6, 64)
    assert trace.layer_ids == tuple(layers.tolist()) == (2, 3, 4, 5, 6, 7, 8, 9)
    assert trace.ids[100, 3].tolist() == raw[3, 100].tolist()  # token 100, trace layer 3
    assert trace.weights is not None and trace.weights[100, 3].tolist() == scores[3, 100].tolist()
    decoder = load_trace(FLAME, part="decoder")
    assert decoder.num_steps == 10 and decoder.tokens_per_step().tolist() == [64] * 10
    assert decoder.step_ids(4)[17, 2].tolist() == dec[4, 2, 17].tolist()  # position 4, segment 17, layer 2


def test_import_overrides(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"layers": [[0, 3]]}\n')
    trace = load_trace(path, num_experts=16, expert_bytes=5, model="m")
    assert (trace.num_experts, trace.expert_bytes, trace.model) == (16, 5, "m")
    assert load_trace(path).num_experts == 4  # inferred: largest id + 1


def test_flame_layout_by_content(tmp_path: Path) -> None:
    path = tmp_path / "f.npz"
    ids = np.array([[[0, 1], [2, 3], [1, 3]]], dtype=np.int16)  # [1 layer, 3 tokens, 2]
    np.savez(path, encoder_topk_ids=ids, layers=np.array([4]))
    trace = load_trace(path, num_experts=4)
    assert trace.num_steps == 3 and trace.layer_ids == (4,) and trace.weights is None


# -- malformed traces: one clear line each -------------------------------------------------------------------
BAD_TRACES: dict[str, tuple[dict[str, Any], str]] = {
    "ids not 3-D": ({"ids": np.zeros((5, 2), dtype=np.int64)}, "tokens, layers, top_k"),
    "float ids": ({"ids": np.zeros((5, 2, 2))}, "integers"),
    "id too large": ({"ids": np.full((5, 2, 2), 8)}, "out of range"),
    "negative id": ({"ids": -np.ones((5, 2, 2), dtype=np.int64)}, "out of range"),
    "duplicate in top-k": ({"ids": np.zeros((5, 2, 2), dtype=np.int64)}, "duplicate"),
    "offsets not from 0": ({"step_offsets": np.array([1, 3, 4, 5])}, "from 0"),
    "offsets short": ({"step_offsets": np.array([0, 3, 4])}, "5 tokens"),
    "empty step": ({"step_offsets": np.array([0, 3, 3, 5])}, "no tokens"),
    "offsets 2-D": ({"step_offsets": np.array([[0, 5]])}, "1-D"),
    "weights shape": ({"weights": np.ones((5, 2, 3), dtype=np.float32)}, "shape of ids"),
    "weights not finite": ({"weights": np.full((5, 2, 2), np.nan, dtype=np.float32)}, "finite"),
    "layer_ids length": ({"layer_ids": (1, 2, 3)}, "layer_ids"),
    "no experts": ({"num_experts": 0}, "num_experts"),
    "top_k above experts": ({"num_experts": 1}, "out of range"),
    "bad expert_bytes": ({"expert_bytes": -4}, "expert_bytes"),
}


@pytest.mark.parametrize("case", list(BAD_TRACES))
def test_malformed_trace_errors(case: str) -> None:
    overrides, message = BAD_TRACES[case]
    with pytest.raises(TraceError, match=message) as info:
        small_trace(**overrides)
    assert "\n" not in str(info.value)


def test_out_of_range_error_says_where() -> None:
    ids = small_trace().ids.copy()
    ids[3, 1, 0] = 9
    with pytest.raises(TraceError, match=r"expert id 9 out of range \[0, 8\) at step 1, token 3, layer 1"):
        small_trace(ids=ids)


def _native_arrays(tmp_path: Path) -> dict[str, np.ndarray]:
    with np.load(small_trace().save(tmp_path / "ok.npz"), allow_pickle=False) as z:
        return {name: z[name] for name in z.files}


def _meta_with(arrays: dict[str, np.ndarray], **changes: Any) -> dict[str, np.ndarray]:
    meta = json.loads(str(arrays["meta"]))
    meta.update(changes)
    return {**arrays, "meta": np.array(json.dumps(meta))}


@pytest.mark.parametrize(
    "change,message",
    [
        ({"num_layers": 3}, "3 layers but ids has 2"),
        ({"top_k": 4}, "top_k=4 but ids has 2"),
        ({"num_experts": "8"}, "'num_experts' must be an integer"),
        ({"version": 2}, "unsupported trace version"),
        ({"format": "other"}, "not a moe-offload-trace file"),
        ({"layer_ids": "1,3"}, "layer_ids"),
    ],
)
def test_inconsistent_metadata(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    arrays = _meta_with(_native_arrays(tmp_path), **change)
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    with pytest.raises(TraceError, match=message) as info:
        load_trace(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_missing_array_and_bad_meta(tmp_path: Path) -> None:
    arrays = _native_arrays(tmp_path)
    without_ids = {k: v for k, v in arrays.items() if k != "ids"}
    with pytest.raises(TraceError, match="missing array 'ids'"):
        from_arrays(without_ids)
    with pytest.raises(TraceError, match="not valid JSON"):
        from_arrays({**arrays, "meta": np.array("{oops")})


@pytest.mark.parametrize(
    "content,message",
    [
        ("", "no steps"),
        ('{"layers": [[0, 1]]}\nnot json\n', r":2: not valid JSON"),
        ('{"tok": 1}\n', "'layers' list"),
        ('{"layers": [[0, 1], [2, 3]]}\n{"layers": [[0, 1]]}\n', "step 2 has 1 layers"),
        ('{"layers": [[0, 1]]}\n{"layers": [[0, 1, 2]]}\n', "has 3 experts"),
        ('{"layers": [[0, "1"]]}\n', "integer expert ids"),
        ('{"layers": [[0, 0]]}\n', "duplicate"),
        ('{"layers": [[0, -1]]}\n', "out of range"),
    ],
)
def test_malformed_jsonl(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(content)
    with pytest.raises(TraceError, match=message) as info:
        load_trace(path)
    assert "\n" not in str(info.value)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="no such trace file"):
        load_trace(tmp_path / "missing.npz")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(TraceError, match=r"not a readable \.npz"):
        load_trace(garbage)
    binary = tmp_path / "noise.bin"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(TraceError, match="not a trace"):
        load_trace(binary)
    other = tmp_path / "other.npz"
    np.savez(other, something=np.zeros(3))
    with pytest.raises(TraceError, match=r"unrecognized \.npz trace"):
        load_trace(other)


def test_pickled_arrays_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "pickled.npz"
    arrays = _native_arrays(tmp_path)
    np.savez(path, **{**arrays, "ids": np.array([object()], dtype=object)})  # type: ignore[arg-type]
    with pytest.raises(TraceError, match=r"not a readable \.npz"):
        load_trace(path)


def test_vendored_traces_are_the_published_files() -> None:
    """data/traces holds unmodified copies of the shared traces and the reference model's trace recorded here
    (bench/reference_trace.py); their checksums are pinned."""
    import hashlib

    sums = (TRACES / "SHA256SUMS").read_text().split("\n")
    pinned = dict(reversed(line.split()) for line in sums if line.strip())
    assert set(pinned) == {
        "flame-moe-290m_routing.npz",
        "olmoe-1b-7b_decode_299.jsonl",
        "reference-moe_heldout_decode_2048.npz",
        "reference_hit_rates.txt",
    }
    for name, digest in pinned.items():
        assert hashlib.sha256((TRACES / name).read_bytes()).hexdigest() == digest, name
    # The olmoe file's published prefix and suffix (traces README: "sha256 7d8e7f63...4383b").
    assert pinned["olmoe-1b-7b_decode_299.jsonl"].startswith("7d8e7f63")
    assert pinned["olmoe-1b-7b_decode_299.jsonl"].endswith("4383b")
