"""Triton fused MoE kernels against the torch reference, on CPU through Triton's interpreter.

Without CUDA these tests run in Triton's interpreter. ``TRITON_INTERPRET=1`` only works if it is set before
*triton* is imported (triton decorates its own library, ``tl.zeros``, ``tl.sum``, at import), so
``tests/conftest.py`` sets it before anything imports triton. With CUDA the kernels are compiled for the GPU.

Tolerances, kernel vs reference in the same dtype (``assert_close``: ``|a - b| <= atol + rtol * |b|``), with
outputs of order 1: fp32 ``1e-5`` / ``1e-5`` (observed <= 5e-7: summation order only); fp16 ``2e-3`` /
``2e-3`` (observed <= 2e-3: one or two fp16 ulps, since the reference rounds the gate/up output and the
activation to fp16 where the kernel keeps fp32); bf16 ``1.6e-2`` / ``1.6e-2`` (two bf16 ulps, same reason).
Wave independence and determinism are checked bitwise (``torch.equal``).
"""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from offload.errors import OffloadError
from offload.kernels import ExpertActivation, RoutedTokens, expert_pairs_torch, select_kernel
from offload.kernels.selection import interpreter_ready
from offload.memory.layout import ExpertLayout
from offload.memory.slot_pool import SlotPool
from tests.helpers import ROOT

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
assert HAS_CUDA or interpreter_ready(), (
    "tests/conftest.py must set TRITON_INTERPRET=1 before triton is imported"
)
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def triton_kernel(**options: object):
    """The dispatched Triton kernel, with launch options overridden (a fresh object: no shared counters)."""
    return select_kernel("triton", DEVICE).with_options(**options)


# -- cases ------------------------------------------------------------------------------------------------

_ACT_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


def make_activation(kind: str, has_gate: bool) -> ExpertActivation:
    """The ExpertActivation that offload.hf.activation.activation_of builds, written out (HF's own math)."""
    if kind == "gpt_oss":
        alpha, limit = 1.702, 7.0

        def glu(x: torch.Tensor) -> torch.Tensor:
            gate, up = x.chunk(2, dim=-1)
            gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
            return (up + 1) * gate * torch.sigmoid(gate * alpha)

        return ExpertActivation("gpt_oss", True, glu, alpha=alpha, limit=limit)
    act = _ACT_FNS[kind]
    if not has_gate:
        return ExpertActivation(kind, False, act)

    def gated(x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return act(gate) * up

    return ExpertActivation(kind, True, gated)


@dataclass
class Case:
    """One layer call: experts' bytes in a host store, a (smaller) slot pool, the routing."""

    layout: ExpertLayout
    store: torch.Tensor  # [E, nbytes] uint8: every expert, canonical layout
    pool: SlotPool
    routed: RoutedTokens
    activation: ExpertActivation

    @property
    def num_pairs(self) -> int:
        return self.routed.top_k_index.numel()

    def run(self, kernel: Callable[..., None], waves: list[list[tuple[int, int]]]) -> torch.Tensor:
        """Like the runtime: per wave, copy each (expert, slot) in, run the kernel; out is [T*k, H]."""
        out_dtype = torch.promote_types(self.routed.hidden.dtype, self.routed.top_k_weights.dtype)
        out = torch.zeros((self.num_pairs, self.layout.hidden_size), dtype=out_dtype, device=DEVICE)
        for wave in waves:
            for expert, slot in wave:
                self.pool.slot(slot).copy_(self.store[expert])
            experts, slots = zip(*wave, strict=True) if wave else ((), ())
            kernel(self.routed, list(experts), list(slots), self.pool, self.activation, out)
        return out

    def one_wave(self, experts: list[int] | None = None) -> list[list[tuple[int, int]]]:
        """All ``experts`` (default: the routed ones) in one wave, in scattered, non-identity slots."""
        experts = self.routed.experts if experts is None else experts
        slots = random.Random(len(experts)).sample(range(self.pool.num_slots), len(experts))
        return [list(zip(experts, slots, strict=True))]


def make_case(
    tokens: int = 7,
    hidden: int = 32,
    inter: int = 48,
    num_experts: int = 6,
    top_k: int = 2,
    slots: int | None = None,
    has_gate: bool = True,
    has_bias: bool = False,
    kind: str = "silu",
    dtype: torch.dtype = torch.float32,
    only_experts: list[int] | None = None,  # route to these experts only: the others get zero pairs
    seed: int = 0,
) -> Case:
    g = torch.Generator().manual_seed(seed)
    layout = ExpertLayout(hidden, inter, has_gate, has_bias, dtype)
    store = torch.zeros((num_experts, layout.nbytes), dtype=torch.uint8)
    for view in layout.views(store).values():
        fan_in = view.shape[-1] if view.dim() == 3 else 4  # outputs of order 1
        view.copy_((torch.randn(view.shape, generator=g) / fan_in**0.5).to(dtype))
    return routed_case(layout, store, g, tokens, top_k, slots, kind, only_experts)


def routed_case(
    layout: ExpertLayout,
    store: torch.Tensor,  # [E, nbytes] on the host, filled
    g: torch.Generator,
    tokens: int,
    top_k: int,
    slots: int | None,
    kind: str,
    only_experts: list[int] | None,
) -> Case:
    """The rest of a case once its experts are in ``store``: a pool with garbage in every slot, a random
    routing (to ``only_experts`` when given) and the tokens, drawn from ``g``."""
    num_experts = store.shape[0]
    pool = SlotPool(layout, slots or num_experts + 3, DEVICE)
    pool.data.fill_(0xFF)  # garbage (NaN) in slots nobody loaded: reading the wrong slot shows
    logits = torch.randn(tokens, num_experts, generator=g)
    if only_experts is not None:
        mask = torch.full((num_experts,), float("-inf"))
        mask[only_experts] = 0
        logits = logits + mask
    weights, index = logits.softmax(-1).topk(top_k, dim=-1)
    x = torch.randn(tokens, layout.hidden_size, generator=g).to(layout.dtype)
    w = weights.to(layout.dtype)
    routed = RoutedTokens.build(x.to(DEVICE), index.to(DEVICE), w.to(DEVICE), num_experts)
    return Case(layout, store.to(DEVICE), pool, routed, make_activation(kind, layout.has_gate))


def waves_of(case: Case, size: int, seed: int) -> list[list[tuple[int, int]]]:
    """The routed experts, shuffled, in waves of ``size`` (ascending inside a wave, like the cache),
    each wave in a random subset of the slots."""
    rng = random.Random(seed)
    experts = list(case.routed.experts)
    rng.shuffle(experts)
    waves = []
    for i in range(0, len(experts), size):
        chunk = sorted(experts[i : i + size])
        waves.append(list(zip(chunk, rng.sample(range(case.pool.num_slots), len(chunk)), strict=True)))
    return waves


def check(case: Case, kernel: Callable[..., None], waves: list[list[tuple[int, int]]] | None = None) -> None:
    waves = waves if waves is not None else case.one_wave()
    ref = case.run(expert_pairs_torch, waves)
    out = case.run(kernel, waves)
    torch.testing.assert_close(out, ref, **TOL[case.layout.dtype])


def as_fp32(case: Case) -> Case:
    """The same experts and inputs (already rounded to the case's dtype), in fp32: an oracle."""
    layout = ExpertLayout(
        case.layout.hidden_size, case.layout.intermediate_size, case.layout.has_gate, case.layout.has_bias,
        torch.float32,
    )  # fmt: skip
    store = torch.zeros((case.store.shape[0], layout.nbytes), dtype=torch.uint8, device=DEVICE)
    ours = layout.views(store)
    for name, view in case.layout.views(case.store).items():
        ours[name].copy_(view.float())
    r = case.routed
    routed = RoutedTokens.build(r.hidden.float(), r.top_k_index, r.top_k_weights.float(), case.store.shape[0])
    return Case(layout, store, SlotPool(layout, case.pool.num_slots, DEVICE), routed, case.activation)


def check_against_oracle(case: Case, kernel: Callable[..., None]) -> None:
    """Large reductions in 16 bits: compare kernel and reference with an fp32 oracle. The kernel keeps
    fp32 between the two matmuls, so it must be within the dtype's tolerance of the oracle and no less
    accurate than the reference (which rounds gate/up and the activation)."""
    waves = case.one_wave()
    oracle = as_fp32(case).run(expert_pairs_torch, waves).float()
    ref_err = (case.run(expert_pairs_torch, waves).float() - oracle).abs().max().item()
    out = case.run(kernel, waves).float()
    torch.testing.assert_close(out, oracle, **TOL[case.layout.dtype])
    assert (out - oracle).abs().max().item() <= 1.5 * ref_err + 1e-6


# -- correctness grid -------------------------------------------------------------------------------------

PATHS = ["decode", "prefill"]
# (kind, has_gate, has_bias): every fused activation, with and without gate, with and without bias
VARIANTS = [
    ("silu", True, False),
    ("silu", False, True),
    ("gelu_tanh", True, True),
    ("gelu_tanh", False, False),
    ("gelu", True, False),
    ("gelu", False, True),
    ("relu", True, True),
    ("relu", False, False),
    ("gpt_oss", True, True),
    ("gpt_oss", True, False),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("kind", "has_gate", "has_bias"), VARIANTS)
def test_activations_bias_and_gate(path: str, kind: str, has_gate: bool, has_bias: bool) -> None:
    case = make_case(kind=kind, has_gate=has_gate, has_bias=has_bias, hidden=40, inter=24)
    check(case, triton_kernel(path=path, block_m=16))


# name -> make_case arguments
SHAPES: dict[str, dict] = {
    "single_token": dict(tokens=1),
    "top1": dict(tokens=9, top_k=1),
    "empty_experts": dict(tokens=6, num_experts=10, only_experts=[1, 4, 5, 8]),
    "more_experts_than_slots": dict(tokens=8, num_experts=12, top_k=3, slots=4),
    "odd_sizes": dict(tokens=5, hidden=24, inter=40, top_k=3),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_shapes(shape: str, path: str, dtype: torch.dtype) -> None:
    case = make_case(dtype=dtype, **SHAPES[shape])
    experts = case.routed.experts
    if shape == "empty_experts":  # the wave also names experts with no pairs at all
        assert len(experts) < 10
        waves = case.one_wave(list(range(10)))
    elif case.pool.num_slots < len(experts):
        waves = waves_of(case, case.pool.num_slots, seed=1)
        assert len(waves) > 1
    else:
        waves = case.one_wave()
    check(case, triton_kernel(path=path, block_m=16), waves)


@pytest.mark.parametrize("split", [2, 3])
@pytest.mark.parametrize("has_gate", [True, False])
def test_decode_split_k(split: int, has_gate: bool) -> None:
    """Split-K: fp32 partials reduced in a fixed order; K = 40 with 8-wide tiles splits unevenly."""
    case = make_case(hidden=40, inter=40, has_gate=has_gate, has_bias=True)
    kernel = triton_kernel(path="decode", split_k=split, decode_block_k=8)
    check(case, kernel)
    assert kernel.last_plan.gate_up.split == split and kernel.last_plan.down.split == split


@pytest.mark.parametrize("path", PATHS)
def test_bf16_with_upcast(path: str) -> None:
    """bf16 in the interpreter: the GEMV upcasts its loads; the tl.dot tiles are upcast to fp32 (the
    interpreter's bf16 tl.dot is wrong). On a GPU the tl.dot runs in bf16: see the gpu tests."""
    check(make_case(dtype=torch.bfloat16, has_bias=True), triton_kernel(path=path, block_m=16))


@pytest.mark.parametrize("path", PATHS)
def test_prepared_launches_and_oracle(path: str) -> None:
    """prepare() (host work once, then launches only) gives the same bits as a call; and bf16 against an
    fp32 oracle, the check the GPU tests make at real sizes."""
    case = make_case(dtype=torch.bfloat16, tokens=6)
    kernel = triton_kernel(path=path, block_m=16)
    waves = case.one_wave()
    expected = case.run(kernel, waves)
    out = torch.zeros_like(expected)
    experts, slots = zip(*waves[0], strict=True)
    run = kernel.prepare(case.routed, list(experts), list(slots), case.pool, case.activation, out)
    run()
    assert torch.equal(out, expected)
    check_against_oracle(case, kernel)


def test_padding_expert_ids_are_skipped() -> None:
    """Some models route padding to expert E (out of range): those rows must stay untouched."""
    case = make_case(tokens=5)
    index = case.routed.top_k_index.clone()
    index[1, 0] = 6  # == num_experts
    weights = case.routed.top_k_weights
    case.routed = RoutedTokens.build(case.routed.hidden, index, weights, 6)
    for path in PATHS:
        out = case.run(triton_kernel(path=path, block_m=16), case.one_wave())
        torch.testing.assert_close(out, case.run(expert_pairs_torch, case.one_wave()), **TOL[torch.float32])
        assert torch.all(out[2] == 0)


def test_custom_activation_falls_back_to_torch() -> None:
    case = make_case()
    case.activation = ExpertActivation("custom", True, case.activation.fn)
    kernel = triton_kernel()
    waves = case.one_wave()
    assert torch.equal(case.run(kernel, waves), case.run(expert_pairs_torch, waves))
    assert kernel.calls == {"torch": 1}


# -- invariants: wave independence, determinism -----------------------------------------------------------


@pytest.mark.parametrize(("path", "split"), [("decode", None), ("decode", 2), ("prefill", None)])
def test_bitwise_independent_of_waves_and_slots(path: str, split: int | None) -> None:
    case = make_case(tokens=5, num_experts=9, top_k=3, slots=12, has_bias=True, seed=3)
    kernel = triton_kernel(path=path, block_m=16, split_k=split, decode_block_k=16 if split else None)
    whole = case.run(kernel, case.one_wave())
    assert torch.equal(whole, case.run(kernel, case.one_wave()))  # run to run
    for size, seed in [(1, 0), (4, 1)]:
        waves = waves_of(case, size, seed)
        assert torch.equal(case.run(kernel, waves), whole), f"waves of {size}"


@pytest.mark.parametrize("path", PATHS)
def test_slot_table_row_equals_the_copied_slot_map(path: str) -> None:
    """A single-wave call may read its slots from the pool's device slot table (the layer step passes the
    layer's row) instead of a slot map copied from the host: the same bits. Stale entries of experts that
    are not in the call are never read."""
    case = make_case(tokens=9, num_experts=8, top_k=2, slots=12)
    wave = case.one_wave()[0]
    by_map = case.run(triton_kernel(path=path), [wave])
    row = torch.full((case.routed.num_experts,), -1, dtype=torch.int32, device=DEVICE)
    row[[e for e in range(case.routed.num_experts) if e not in case.routed.spans]] = 0  # stale: slot 0
    for expert, slot in wave:
        row[expert] = slot
    out = torch.full_like(by_map, float("nan"))
    experts, slots = zip(*wave, strict=True)
    triton_kernel(path=path)(
        case.routed, list(experts), list(slots), case.pool, case.activation, out, slot_row=row
    )
    assert torch.equal(out, by_map)


def test_launch_heuristics() -> None:
    """plan_launch is pure: the path and tiles come from the layer call (T*k, pair counts), the shapes and
    the device, never from the wave, which is what keeps results wave-independent."""
    from offload.kernels.triton.launch_plan import DeviceInfo, GemmTiles, TritonMoeOptions, plan_launch

    h100 = DeviceInfo(sm_count=132, smem_bytes=227 * 1024)
    consumer = DeviceInfo(sm_count=46, smem_bytes=99 * 1024)
    cpu = DeviceInfo(sm_count=0, smem_bytes=1 << 30)
    mixtral = ExpertLayout(4096, 14336, True, False, torch.bfloat16)

    def plan(pairs: int, max_per_expert: int, active: int, device: DeviceInfo = h100):
        return plan_launch(pairs, max_per_expert, active, mixtral, device, TritonMoeOptions())

    one_token = plan(2, 1, 2)
    assert one_token.path == "decode"
    assert one_token.gate_up.split == 1  # 2 pairs x 896 column tiles already fill 132 SMs
    assert one_token.down.split > 1  # 2 pairs x 128 column tiles do not: split K = 14336
    assert plan(2, 1, 2, cpu).down.split == 1  # no split-K where there are no SMs to fill
    assert plan(32, 4, 8).path == "decode" and plan(32, 5, 8).path == "prefill"
    big = plan(8192, 1100, 8)
    assert big.path == "prefill" and big.gate_up.block_m == 128
    for device in (h100, consumer):
        tiles = plan(8192, 1100, 8, device).gate_up
        assert isinstance(tiles, GemmTiles)
        per_stage = (tiles.block_m + 2 * tiles.block_n) * tiles.block_k * 2  # A + gate and up tiles, bf16
        assert tiles.num_stages * per_stage <= device.smem_bytes
    # The GEMV rereads an expert's weights once per pair: fine for a few pairs, never picked for a prefill.
    # Mixtral at 1024-4096 tokens (top-2 of 8: hundreds of pairs per expert) always takes the tl.dot path.
    g = torch.Generator().manual_seed(0)
    for tokens in (1024, 2048, 4096):
        index = torch.rand(tokens, 8, generator=g).topk(2, dim=-1).indices
        routed = RoutedTokens.build(torch.empty(tokens, 8), index, torch.ones(tokens, 2), 8)
        chosen = plan(tokens * 2, routed.max_pairs_per_expert, len(routed.experts))
        assert routed.max_pairs_per_expert > 200 and chosen.path == "prefill"


# -- dispatch ---------------------------------------------------------------------------------------------


def test_dispatch() -> None:
    cpu = torch.device("cpu")
    assert select_kernel("torch", cpu) is expert_pairs_torch
    assert select_kernel("auto", cpu) is expert_pairs_torch
    assert select_kernel("torch", "cuda:0") is expert_pairs_torch
    with pytest.raises(ValueError, match="kernel must be one of auto, torch, triton"):
        select_kernel("cuda", cpu)
    if HAS_CUDA:
        from offload.kernels.triton.launch import expert_pairs_triton

        assert select_kernel("auto", DEVICE) is select_kernel("triton", DEVICE) is expert_pairs_triton


@pytest.mark.skipif(HAS_CUDA, reason="CPU behaviour")
def test_dispatch_triton_on_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    assert callable(select_kernel("triton", "cpu"))
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1") as err:
        select_kernel("triton", "cpu")
    assert isinstance(err.value, OffloadError)  # the CLI's one-line error, not a traceback


# -- end to end -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import transformers

    config = transformers.MixtralConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_mixtral")
    transformers.MixtralForCausalLM(config).save_pretrained(path)
    return path


def test_generate_triton_equals_torch(tiny_mixtral: Path) -> None:
    """Greedy generation: same tokens with kernel="triton" as with "torch"; and with triton, bitwise the
    same logits whether every expert is resident or only two slots exist (prefill runs in several waves)."""
    import offload

    prompt = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    runs = {}
    for kernel, budget in [("torch", "100MB"), ("triton", "100MB"), ("triton", "min")]:
        if budget == "min":
            with pytest.raises(offload.BudgetError) as err:
                offload.from_pretrained(tiny_mixtral, vram_budget=1, device=DEVICE, dtype="fp32",
                                        kernel=kernel, workspace_bytes=0, max_context=64, progress=False)  # fmt: skip
            budget = err.value.minimum_bytes
        model = offload.from_pretrained(tiny_mixtral, vram_budget=budget, device=DEVICE, dtype="fp32",
                                        kernel=kernel, workspace_bytes=0, max_context=64, progress=False)  # fmt: skip
        out = model.generate(prompt, max_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)  # fmt: skip
        runs[kernel, str(budget)] = (out, offload.stats(model))
    (ref, _), (fast, _), (tight, tight_stats) = runs.values()
    assert torch.equal(fast.sequences, ref.sequences)
    for a, b in zip(fast.logits, ref.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert tight_stats.slots == 2 and tight_stats.waves > tight_stats.layer_calls
    assert torch.equal(tight.sequences, fast.sequences)
    assert all(torch.equal(a, b) for a, b in zip(tight.logits, fast.logits, strict=True))
    calls = select_kernel("triton", DEVICE).calls  # the shared instance the runtime used
    assert calls["decode"] > 0 and calls["prefill"] > 0


# -- compiled for real GPUs, without one -------------------------------------------------------------------

AOT_RUNS = {
    "bf16+fp32 h100+rtx3090": "--target h100 --target rtx3090 --dtype bf16 --dtype fp32 "
    "--model qwen3-30b-a3b --model mixtral-8x7b --tokens 1 --tokens 4096",
    "fp16 bias a100+rtx4090": "--target a100 --target rtx4090 --dtype fp16 --bias --model olmoe-1b-7b "
    "--tokens 1 --tokens 64",
}


@pytest.mark.parametrize("run", list(AOT_RUNS))
def test_launches_compile_for_gpus(run: str) -> None:
    """The launches the heuristics make for real shapes (decode with split-K, prefill tiles) compile to cubin
    for sm_80/86/89/90 with triton's own ptxas, take exactly the kernels' parameters, fit the target's
    shared memory, and use tensor cores and vector loads (offload.kernels.triton.aot). Runs in a
    subprocess: compiling needs the GPU build of the kernels, not the interpreter's."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "offload.kernels.triton.aot", *AOT_RUNS[run].split()]
    root = ROOT
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "pairs_gemm" in done.stdout and "pairs_gemv" in done.stdout
    if "h100" in run:
        assert "splitk_reduce" in done.stdout  # Mixtral's down projection at one token splits K


def test_every_variant_compiles() -> None:
    """Every distinct kernel the dispatch can pick (tiles across token counts for the four model shapes,
    every activation and gate/bias layout) compiles for sm_90 in bf16, fp16 and fp32 and for sm_80 in bf16,
    and passes the same checks; the compressed formats for sm_90 in bf16 (310 launches). Two shards per
    run. (The formats in every one of those dtypes and targets, 451 launches, and the float kernels for all
    four targets in all three dtypes, 720, pass too: docs/kernels.md; too slow to repeat in every CI run.)"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    runs = [("--target", "h100", "--dtype", "bf16"),
            ("--target", "h100", "--dtype", "fp16", "--dtype", "fp32", "--float-only"),
            ("--target", "a100", "--dtype", "bf16", "--float-only")]  # fmt: skip
    procs = []
    for run in runs:
        for i in range(2):
            cmd = [
                sys.executable,
                "-m",
                "offload.kernels.triton.aot",
                "--all-variants",
                *run,
                "--shard",
                f"{i}/2",
            ]
            procs.append(
                subprocess.Popen(
                    cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
                )
            )
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out[-4000:]
    compiled = sum(int(out.split(" distinct launches")[0].split()[-1]) for out in outputs)
    assert compiled > 200 and all(line.endswith(" ok") for out in outputs for line in out.splitlines()[1:])


@pytest.mark.skipif(HAS_CUDA, reason="the CPU smoke run of the benchmark")
def test_bench_smoke(tmp_path: Path) -> None:
    """bench/kernels.py --smoke runs (tiny shapes, CPU, interpreter) and writes a labelled JSON."""
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script sets it itself
    out = tmp_path / "smoke.json"
    root = ROOT
    cmd = [sys.executable, "bench/kernels.py", "--smoke", "--tokens", "1", "--tokens", "16",
           "--impl", "triton", "--impl", "grouped_mm", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["smoke"] is True and "NOT performance" in result["what"]
    assert {r["impl"] for r in result["rows"]} == {"triton", "grouped_mm"}
    assert all(r["max_abs_err_vs_torch"] < 1e-5 for r in result["rows"])


# -- GPU only ---------------------------------------------------------------------------------------------


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 4, 64, 512])
def test_gpu_realistic_shapes(dtype: torch.dtype, tokens: int) -> None:
    """Qwen3-30B-A3B expert shapes, the heuristics' own tiles and split-K, 16-bit tl.dot on tensor cores."""
    case = make_case(tokens=tokens, hidden=2048, inter=768, num_experts=128, top_k=8, slots=140, dtype=dtype)
    for path in ("auto", "decode", "prefill"):
        check_against_oracle(case, triton_kernel(path=path))


@gpu
@needs_cuda
def test_gpu_prepared_launches_replay_in_a_cuda_graph() -> None:
    """What bench/kernels.py times: prepare() once, capture the launches in a CUDA graph, replay."""
    case = make_case(tokens=3, hidden=256, inter=512, num_experts=16, top_k=4, dtype=torch.bfloat16)
    waves = case.one_wave()
    expected = case.run(triton_kernel(), waves)
    out = torch.zeros_like(expected)
    experts, slots = zip(*waves[0], strict=True)
    run = triton_kernel().prepare(case.routed, list(experts), list(slots), case.pool, case.activation, out)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected)


@gpu
@needs_cuda
@pytest.mark.parametrize("path", PATHS)
def test_gpu_bitwise_independent_of_waves(path: str) -> None:
    case = make_case(tokens=96, hidden=512, inter=256, num_experts=32, top_k=4, slots=40,
                     dtype=torch.bfloat16, has_bias=True)  # fmt: skip
    kernel = triton_kernel(path=path)
    whole = case.run(kernel, case.one_wave())
    assert torch.equal(whole, case.run(kernel, case.one_wave()))
    for size, seed in itertools.product([3, 8], [0, 1]):
        assert torch.equal(case.run(kernel, waves_of(case, size, seed)), whole)
