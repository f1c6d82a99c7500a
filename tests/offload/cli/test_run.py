"""offload-run end to end, and every bad input: one line on stderr, exit code 2, nothing written."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from offload.cli.run import main
from offload.config import OffloadConfig
from offload.hf.demo import DEMO_NEW_TOKENS, DEMO_PROMPT
from offload.hf.skeleton import survey_checkpoint
from offload.runtime.budget import CUBLAS_WORKSPACE_BYTES, budget_for_slots
from tests.conftest import DEVICES, save_tiny


def budget_for(
    path: Path, slots: int, max_context: int, dtype: str | None = None, device: str = "cpu"
) -> str:
    """The --vram-budget that leaves exactly ``slots`` slots on ``device``: a CUDA plan holds more than a CPU one
    (cuBLAS's workspace, offload.runtime.budget), so a CPU plan's budget leaves a CUDA run short of slots.
    Planned without a GPU too: the plan reads only the device's type."""
    config = OffloadConfig.create(1, device="cpu", dtype=dtype, max_context=max_context)
    config = dataclasses.replace(config, device=torch.device(device))
    return str(budget_for_slots(survey_checkpoint(str(path), config.dtype), config, slots))


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what fixtures printed (save_pretrained's bars)
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_usage_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    assert lines[0].startswith("offload-run: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


def test_runs_and_writes_stats(
    cli_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stats_file = tmp_path / "stats.json"
    budget = budget_for(cli_checkpoint, 6, 128)
    argv = [
        "--model",
        str(cli_checkpoint),
        "--vram-budget",
        budget,
        "--device",
        "cpu",
        "--max-context",
        "128",
    ]
    argv += ["--prompt", "hello", "--max-new-tokens", "6", "--stats-json", str(stats_file)]
    code, _out, err = run(argv, capsys)
    assert code == 0, err
    assert "--- offload-run summary ---" in err
    for label in ("prefill", "decode", "hit rate", "GB/s", "slots", "budget"):
        assert label in err
    stats = json.loads(stats_file.read_text())
    assert stats["new_tokens"] == 6 and stats["prompt_tokens"] == 5
    assert stats["expert_hits"] + stats["expert_misses"] == stats["expert_uses"] > 0
    assert stats["slots"] == 6 < stats["total_experts"]
    assert stats["budget_bytes"] == int(budget)
    assert stats["expert_misses"] > 0


def test_prefill_in_chunks(cli_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--prefill-chunk 8 prefills an 88-token prompt in chunks: the same greedy text as one forward over it,
    and the summary and the stats say so."""
    prompt = "the quick brown fox jumps over the lazy dog " * 2  # bytes: 88 tokens
    texts, stats = [], []
    for chunk in ("8", "off"):
        stats_file = tmp_path / f"stats-{chunk}.json"
        budget = budget_for(cli_checkpoint, 6, 128)
        argv = [
            "--model",
            str(cli_checkpoint),
            "--vram-budget",
            budget,
            "--device",
            "cpu",
            "--max-context",
            "128",
        ]
        argv += ["--prompt", prompt, "--max-new-tokens", "6", "--prefill-chunk", chunk]
        code, out, err = run([*argv, "--stats-json", str(stats_file)], capsys)
        assert code == 0, err
        texts.append(out)
        stats.append(json.loads(stats_file.read_text()))
        assert ("in chunks of 8" in err) == (chunk == "8")
    assert texts[0] == texts[1]
    assert stats[0]["prefill_chunk"] == 8 and stats[1]["prefill_chunk"] == 0
    assert stats[0]["prompt_tokens"] > 8


def test_quantize_reads_the_cached_store_the_second_time(
    cli_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--quantize int4: the summary names the format and where the store came from; the second run reads
    the compressed-store cache, and --no-store-cache quantizes again and writes nothing."""
    from offload.user_cache import user_cache_dir

    checkpoint = tmp_path / "model"  # a path of its own: the cache is keyed by it
    shutil.copytree(cli_checkpoint, checkpoint)
    argv = ["--model", str(checkpoint), "--vram-budget", "1GB", "--device", "cpu", "--max-context", "64"]
    argv += ["--prompt", "hello", "--max-new-tokens", "3", "--quantize", "int4"]
    outputs, sources = [], []
    for extra in ([], [], ["--no-store-cache"]):
        stores = user_cache_dir("stores")
        before = set(stores.iterdir()) if stores.is_dir() else set()
        code, out, err = run([*argv, *extra], capsys)
        assert code == 0, err
        assert "int4" in err.split("slots   :")[1].splitlines()[0]
        source = [line for line in err.splitlines() if line.startswith("store   : ")]
        sources.append(source[0] if source else "")
        outputs.append(out)
        after = set(stores.iterdir()) if stores.is_dir() else set()
        assert len(after - before) == (1 if len(sources) == 1 else 0)
    assert "quantized while loading" in sources[0] and "stored on disk" in sources[0]
    assert "read from the compressed-store cache" in sources[1]
    assert sources[2] == "store   : quantized while loading (the store cache is off)"
    assert outputs[0] == outputs[1] == outputs[2]


def test_greedy_output_matches_hf(cli_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(cli_checkpoint)
    model = transformers.AutoModelForCausalLM.from_pretrained(cli_checkpoint, dtype=torch.float32)
    ids = tokenizer("abc", return_tensors="pt").input_ids
    expected = tokenizer.decode(
        model.generate(ids, max_new_tokens=5, do_sample=False)[0, 3:], skip_special_tokens=True
    )
    budget = budget_for(cli_checkpoint, 4, 64, "fp32")
    argv = ["--model", str(cli_checkpoint), "--vram-budget", budget, "--device", "cpu", "--max-context", "64"]
    code, out, err = run([*argv, "--prompt", "abc", "--max-new-tokens", "5", "--dtype", "fp32"], capsys)
    assert code == 0, err
    assert out.strip() == expected.strip()


@pytest.mark.parametrize("size", ["12XB", "twelve", "-1GB", "0", "12 G B"])
def test_unparseable_size(size: str, cli_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["--model", str(cli_checkpoint), "--vram-budget", size], capsys)
    assert_usage_error(code, err, "--vram-budget")


def test_budget_below_minimum_states_it(cli_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["--model", str(cli_checkpoint), "--vram-budget", "100kB", "--device", "cpu"], capsys)
    assert_usage_error(code, err, "too small", "the minimum is")


def test_missing_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["--model", str(tmp_path / "nope"), "--vram-budget", "1GB"], capsys)
    assert_usage_error(code, err, "does not exist")


def test_hub_id_not_in_cache(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run(["--model", "nobody/no-such-model", "--vram-budget", "1GB"], capsys)
    assert_usage_error(code, err, "local Hugging Face cache")


def test_dense_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4
    )
    save_tiny(config, tmp_path / "llama")
    code, _, err = run(
        ["--model", str(tmp_path / "llama"), "--vram-budget", "1GB", "--device", "cpu"], capsys
    )
    assert_usage_error(code, err, "dense model")


def test_unsupported_architecture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = transformers.JetMoeConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_key_value_heads=2,
        kv_channels=8,
        intermediate_size=48,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    save_tiny(config, tmp_path / "jetmoe")
    code, _, err = run(
        ["--model", str(tmp_path / "jetmoe"), "--vram-budget", "1GB", "--device", "cpu"], capsys
    )
    assert_usage_error(code, err, "jetmoe", "experts interface", "supported: ", "mixtral")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_truncated_safetensors(
    cli_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = _copy(cli_checkpoint, tmp_path / "truncated")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, _, err = run(["--model", str(broken), "--vram-budget", "1GB", "--device", "cpu"], capsys)
    assert_usage_error(code, err, "model.safetensors", "truncated or corrupt")


def test_corrupt_safetensors(
    cli_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = _copy(cli_checkpoint, tmp_path / "corrupt")
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    code, _, err = run(["--model", str(broken), "--vram-budget", "1GB", "--device", "cpu"], capsys)
    assert_usage_error(code, err, "truncated or corrupt")


def test_checkpoint_missing_expert_weights(
    cli_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = _copy(cli_checkpoint, tmp_path / "missing")
    tensors = load_file(broken / "model.safetensors")
    dropped = [k for k in tensors if "layers.1." in k and "experts" in k]
    assert dropped
    save_file({k: v for k, v in tensors.items() if k not in dropped}, broken / "model.safetensors")
    code, _, err = run(["--model", str(broken), "--vram-budget", "1GB", "--device", "cpu"], capsys)
    assert_usage_error(code, err, "layers.1")


def test_checkpoint_missing_other_weights(
    cli_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = _copy(cli_checkpoint, tmp_path / "missing-attn")
    tensors = load_file(broken / "model.safetensors")
    save_file(
        {k: v for k, v in tensors.items() if "layers.2.self_attn.q_proj" not in k},
        broken / "model.safetensors",
    )
    code, _, err = run(["--model", str(broken), "--vram-budget", "1GB", "--device", "cpu"], capsys)
    assert_usage_error(code, err, "missing", "q_proj")


def test_checkpoint_without_tokenizer(
    cli_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = _copy(cli_checkpoint, tmp_path / "no-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (broken / name).unlink()
    code, _, err = run(["--model", str(broken), "--vram-budget", "1GB", "--device", "cpu"], capsys)
    assert_usage_error(code, err, "no tokenizer files")


def test_pickle_only_checkpoint_is_refused(
    cli_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = _copy(cli_checkpoint, tmp_path / "pickled")
    (broken / "model.safetensors").rename(broken / "pytorch_model.bin")
    code, _, err = run(["--model", str(broken), "--vram-budget", "1GB", "--device", "cpu"], capsys)
    assert_usage_error(code, err, "no .safetensors", "pickle")


def test_missing_shard(cli_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = _copy(cli_checkpoint, tmp_path / "sharded")
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    code, _, err = run(["--model", str(broken), "--vram-budget", "1GB", "--device", "cpu"], capsys)
    assert_usage_error(code, err, "missing shard", "model-00002-of-00002")


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--policy", "nonsense"], "unknown policy"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--device", "tpu"], "--device"),
        (["--dtype", "int8"], "--dtype"),
        (["--stats-json", "/nonexistent-dir/stats.json"], "does not exist"),
        (["--host-compute", "sometimes"], "--host-compute"),
        (["--host-threads", "0"], "--host-threads must be at least 1"),
        (["--host-threads", "two"], "--host-threads"),
        (["--prefill-chunk", "0"], "--prefill-chunk: a prefill chunk must be at least 1 token"),
        (["--prefill-chunk", "big"], "--prefill-chunk: expected auto, off or a number of tokens"),
    ],
)
def test_bad_options(
    extra: list[str], needle: str, cli_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["--model", str(cli_checkpoint), "--vram-budget", "1GB", *extra], capsys)
    assert_usage_error(code, err, needle)


def test_budget_required_with_model(cli_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["--model", str(cli_checkpoint)], capsys)
    assert_usage_error(code, err, "--vram-budget is required")


def test_failed_run_writes_no_stats(
    cli_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stats_file = tmp_path / "stats.json"
    argv = [
        "--model",
        str(cli_checkpoint),
        "--vram-budget",
        "10kB",
        "--device",
        "cpu",
        "--stats-json",
        str(stats_file),
    ]
    code, _, _ = run(argv, capsys)
    assert code == 2
    assert list(tmp_path.iterdir()) == []


def test_prompt_longer_than_context(cli_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--model", str(cli_checkpoint), "--vram-budget", "1GB", "--device", "cpu", "--max-context", "8"]
    code, _, err = run([*argv, "--prompt", "a long prompt", "--max-new-tokens", "4"], capsys)
    assert_usage_error(code, err, "exceeds --max-context")


def test_embedded_demo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No --model: the reference model at about a quarter of its experts, within its 256 positions, writing
    printable, Python-like text after its prompt."""
    stats_file = tmp_path / "demo.json"
    code, out, err = run(["--device", "cpu", "--stats-json", str(stats_file)], capsys)
    assert code == 0, err
    assert "reference-moe" in err and "Python" in err
    stats = json.loads(stats_file.read_text())
    assert stats["demo"] is True
    assert stats["total_experts"] == 96 and stats["slots"] == 24
    assert stats["new_tokens"] == DEMO_NEW_TOKENS and stats["expert_misses"] > 0
    # prefetch auto: pre-attention, the measured best, for a model with the norm it needs
    assert "prefetch: pre-attention" in err and stats["prefetch_issued"] > 0
    assert out.startswith(DEMO_PROMPT)
    assert all(line.isprintable() for line in out.splitlines()), out
    text = out[len(DEMO_PROMPT) :]
    assert len(text) > 3 * DEMO_NEW_TOKENS // 2  # a BPE token stands for a few characters, none are empty
    # Python's own words, which random weights would hit a few times in 96 tokens of a 4096-token vocabulary
    found = {word for word in ("def ", "return", "self", "import", "if ", "None", "    ") if word in text}
    assert len(found) >= 5, text


def test_demo_respects_its_context(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["--device", "cpu", "--max-new-tokens", "300"], capsys)
    assert_usage_error(code, err, "exceeds --max-context (256)")


def test_record_trace_then_static_profile(
    cli_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    budget = budget_for(cli_checkpoint, 6, 64)
    base = ["--model", str(cli_checkpoint), "--vram-budget", budget, "--device", "cpu", "--max-context", "64"]
    base += ["--prompt", "profile me"]
    trace_file = tmp_path / "routing.npz"
    code, _, err = run([*base, "--max-new-tokens", "5", "--record-trace", str(trace_file)], capsys)
    assert code == 0, err
    from cache_policies import load_trace

    trace = load_trace(trace_file)
    assert trace.num_steps == 5 and trace.num_layers == 3
    code, _, err = run(
        [*base, "--max-new-tokens", "3", "--policy", "static", "--static-profile", str(trace_file)], capsys
    )
    assert code == 0, err
    code, _, err = run([*base, "--policy", "static"], capsys)
    assert_usage_error(code, err, "static_profile")
    code, _, err = run([*base, "--policy", "static", "--static-profile", str(tmp_path / "none.npz")], capsys)
    assert_usage_error(code, err, "--static-profile", "does not exist")
    code, _, err = run([*base, "--record-trace", "/nonexistent-dir/t.npz"], capsys)
    assert_usage_error(code, err, "--record-trace", "does not exist")


def test_budget_for_plans_for_the_device(cli_checkpoint: Path) -> None:
    cpu, cuda = (int(budget_for(cli_checkpoint, 4, 64, "fp32", device=d)) for d in ("cpu", "cuda"))
    assert cuda - cpu == CUBLAS_WORKSPACE_BYTES


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_flag(
    device: str, cli_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--kernel triton runs (on the GPU, or on the CPU in Triton's interpreter, which conftest switches on only
    without a GPU) and gives the torch path's greedy text, at the budget of 4 slots on that device."""
    if device == "cpu" and torch.cuda.is_available():
        pytest.skip("Triton's interpreter is off where there is a GPU (tests/conftest.py)")
    budget = budget_for(cli_checkpoint, 4, 64, "fp32", device=device)
    base = [
        "--model",
        str(cli_checkpoint),
        "--vram-budget",
        budget,
        "--device",
        device,
        "--max-context",
        "64",
    ]
    base += ["--dtype", "fp32", "--prompt", "abc", "--max-new-tokens", "4"]
    # every pair on the kernel under test (on CUDA auto would probe and may compute some on the host)
    base += ["--host-compute", "off", "--stats-json", str(tmp_path / "stats.json")]
    outs = {}
    for kernel in ("torch", "triton"):
        code, out, err = run([*base, "--kernel", kernel], capsys)
        assert code == 0, err
        outs[kernel] = out
        assert json.loads((tmp_path / "stats.json").read_text())["slots"] == 4
    assert outs["torch"] == outs["triton"]
    code, _, err = run([*base, "--kernel", "cuda"], capsys)
    assert_usage_error(code, err, "--kernel")


def test_list_architectures(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["--list-architectures"], capsys)
    assert code == 0
    supported, _, unsupported = out.partition("Not supported:")
    for model_type in ("mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "deepseek_v2", "gpt_oss", "phimoe"):
        assert f"  {model_type} " in supported
    assert "  jetmoe " in unsupported and "experts interface" in unsupported


def test_the_disk_tier_in_the_summary_and_off_in_one_line(
    cli_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A host limit the experts do not fit: the run keeps them on disk and its summary says so in a `disk`
    line; --disk-tier off refuses in one line."""
    from offload.hf.install import runtime_of
    from tests.helpers import slot_counts
    from tests.offload.runtime.test_host_tier import load

    monkeypatch.setenv("MOE_OFFLOAD_CACHE", str(tmp_path))
    host_slots = slot_counts(cli_checkpoint)["all"] // 3
    config = runtime_of(load(cli_checkpoint, slot_counts(cli_checkpoint)["quarter"], host_slots)).config
    argv = ["--model", str(cli_checkpoint), "--device", "cpu", "--dtype", "fp32", "--max-context", "64"]
    argv += ["--vram-budget", str(config.vram_budget), "--host-memory-limit", str(config.host_memory_limit)]
    argv += ["--prompt", "abc", "--max-new-tokens", "3"]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    [disk] = [line for line in err.splitlines() if line.startswith("disk    : ")]
    total = slot_counts(cli_checkpoint)["all"]
    assert "GB read at" in disk and f"{host_slots} / {total} experts in host RAM" in disk
    assert "(on disk, in a host slot, in a slot)" in err
    code, _, err = run([*argv, "--disk-tier", "off"], capsys)
    assert_usage_error(code, err, "disk_tier='auto' would keep the experts on disk")
