"""Host kernels against the dequantize-then-matmul oracle, every format; the host probe and its cache file."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from offload.kernels import ExpertActivation
from offload.kernels.activation import GateTimesUp
from offload.kernels.host_experts import dequantized, host_kernel, host_kernel_candidates
from offload.kernels.kernel_table import KernelTable
from offload.memory.host_store import HostExpertStore
from offload.memory.layout import ExpertLayout
from offload.runtime import host_rates
from offload.runtime.expert_source import InRam
from offload.runtime.host_compute import HostCompute, torch_threads_per_worker

SILU = ExpertActivation("silu", True, GateTimesUp(F.silu))
FORMATS = [
    ("float", torch.float32, 0),
    ("float", torch.bfloat16, 0),
    ("int8", torch.bfloat16, 0),
    ("int8", torch.float32, 0),
    ("int4", torch.bfloat16, 64),
    ("mxfp4", torch.bfloat16, 32),
    ("fp8", torch.bfloat16, 128),
]


def oracle(x, w, fields, layout) -> torch.Tensor:
    """fp64 math on the dequantized weights."""
    gate_up = layout.weight(fields, "gate_up").double()
    down = layout.weight(fields, "down").double()
    h = SILU.fn(F.linear(x.double(), gate_up))
    return F.linear(h, down) * w.double()[:, None]


@pytest.mark.parametrize(("fmt", "dtype", "group"), FORMATS)
@pytest.mark.parametrize("tokens", [1, 5])
def test_every_host_kernel_matches_the_oracle(fmt: str, dtype: torch.dtype, group: int, tokens: int) -> None:
    layout = ExpertLayout(64, 96, True, False, dtype, format=fmt, group_size=group)
    # int4: I = 96 pads the down matrix's last group of 64, which int4pack reads as zeros
    fields = host_rates.synthetic_experts(layout, 1, seed=3, int4pack=fmt in ("int4", "mxfp4"))[0]
    x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
    w = torch.rand(tokens).to(dtype)
    expected = oracle(x, w, fields, layout)
    scale = expected.abs().max().item()
    candidates = host_kernel_candidates(layout, int4pack=True)
    assert candidates[0] == "reference" and ("int8pack" in candidates) == (fmt == "int8")
    assert ("int4pack" in candidates) == (fmt in ("int4", "mxfp4"))
    for name in candidates:
        rows = host_kernel(name)(x, w, fields, layout, SILU, dtype)
        assert rows.shape == (tokens, 64) and rows.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        err = (rows.double() - expected).abs().max().item()
        assert err <= tol * max(scale, 1e-3), f"{name} on {fmt}/{dtype}: error {err:.3g} of {scale:.3g}"


def test_probe_picks_a_kernel_and_rates() -> None:
    layout = ExpertLayout(64, 96, True, False, torch.bfloat16, format="int8")
    table, points = host_rates.probe_host(
        layout, SILU, host_kernel_candidates(layout), repeats=1, torch_threads=1
    )
    assert [n for n, _ in table.points] == list(host_rates.TABLE_TOKENS)
    assert set(table.names) <= set(host_kernel_candidates(layout))
    assert [t for t, _ in points] == list(host_rates.PROBE_TOKENS) and all(g > 0 for _, g in points)


def test_rates_are_cached_in_the_user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOE_OFFLOAD_CACHE", str(tmp_path))
    path = host_rates.rates_path()
    assert path == tmp_path / "rates.json"
    calls = []

    def measure() -> dict:
        calls.append(1)
        return {"table": [[1, "reference"]], "host_gbps": [[1, 5.0]], "link_gbps": 20.0, "device_s": 1e-5}

    needed = ("table", "host_gbps", "link_gbps", "device_s")
    entry, source = host_rates.cached(path, "machine||shape", needed, measure)
    assert source == "measured" and json.loads(path.read_text())["machine||shape"] == entry
    entry2, source2 = host_rates.cached(path, "machine||shape", needed, measure)
    assert source2 == "cached" and entry2 == entry and len(calls) == 1
    rates = host_rates.rates_of(entry2, source2)
    assert rates.link_gbps == 20.0 and rates.host_gbps == ((1, 5.0),) and rates.source == "cached"
    path.write_text("{not json")  # a broken cache file is measured over
    assert host_rates.cached(path, "machine||shape", needed, measure)[1] == "measured"


@pytest.mark.parametrize(
    ("fmt", "dtype", "group"),
    [
        ("int8", torch.bfloat16, 0),
        ("int8", torch.float32, 0),
        ("int4", torch.bfloat16, 64),
        ("int4", torch.bfloat16, 32),
        ("int4", torch.float32, 64),
        ("mxfp4", torch.bfloat16, 32),
        ("fp8", torch.bfloat16, 32),
    ],
)
def test_dequant_reads_back_the_oracles_bits(fmt: str, dtype: torch.dtype, group: int) -> None:
    """Broadcast scales give the dequantize oracle's values exactly: one rounding of an exact product."""
    layout = ExpertLayout(64, 96, True, False, dtype, format=fmt, group_size=group)
    fields = host_rates.synthetic_experts(layout, 1, seed=4)[0]
    for name in ("gate_up", "down"):
        assert torch.equal(dequantized(fields, layout, name), layout.weight(fields, name)), name


def test_host_workers_run_their_share_of_torch_threads() -> None:
    """Each worker runs on its own intra-op thread count; the caller and threads started later keep theirs."""
    before = torch.get_num_threads()
    layout = ExpertLayout(64, 96, True, False, torch.float32)
    store = HostExpertStore(layout, num_layers=1, num_experts=1, pin=False)
    host = HostCompute(InRam(store), KernelTable.single("reference"), threads=2, torch_threads=before + 1)
    try:
        seen = {host._pool.submit(torch.get_num_threads).result() for _ in range(4)}
    finally:
        host.close()
    assert seen == {before + 1}  # not the count the process runs with (1 under `make test`)
    assert torch.get_num_threads() == before
    with ThreadPoolExecutor(1) as other:
        assert other.submit(torch.get_num_threads).result() == before
    assert torch_threads_per_worker(2) == max(1, before // 2)
