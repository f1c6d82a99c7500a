"""Real offload-serve processes on free loopback ports, serving a tiny Mixtral with a byte tokenizer,
and OpenAI clients pointed at them. Each server is stopped when its module's tests end, or when one fails."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch
import transformers

from offload.config import OffloadConfig
from offload.hf.skeleton import survey_checkpoint
from offload.runtime.budget import budget_for_slots
from offload_bench.serve_process import ServerProcess
from tests.byte_tokenizer import CHAT_TEMPLATE, byte_tokenizer
from tests.conftest import TINY_ARCHS, save_tiny

API_KEY = "test-key"
MODEL = "tiny"
MAX_CONTEXT = 512


@pytest.fixture(scope="session")
def chat_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 layers x 8 experts, top-2, the byte tokenizer with its chat template. Only printable ASCII can win
    the logits: the replies are readable (stop strings can be picked from them) and never end early at </s>,
    so a reply is exactly max_tokens long unless a stop string cuts it."""
    directory = tmp_path_factory.mktemp("serve") / "mixtral-chat"
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    config = TINY_ARCHS["mixtral"]()
    config.vocab_size = len(tokenizer)
    config.max_position_embeddings = MAX_CONTEXT
    config.eos_token_id = tokenizer.eos_token_id
    save_tiny(config, directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    printable = [tokenizer.encode(chr(c))[0] for c in range(32, 127)]
    keep = torch.zeros(len(tokenizer), dtype=torch.bool)
    keep[printable] = True
    with torch.no_grad():
        model.lm_head.weight[~keep] = 0  # a positive logit among 95 random rows always wins
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def plain_checkpoint(chat_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model, its tokenizer without a chat template."""
    directory = tmp_path_factory.mktemp("serve") / "mixtral-plain"
    shutil.copytree(chat_checkpoint, directory)
    (directory / "chat_template.jinja").unlink()
    return directory


def budget(path: Path, slots: int = 6) -> str:
    """A budget of ``slots`` of the 24 experts: the cache misses and copies, so the counters move."""
    config = OffloadConfig.create(1, device="cpu", max_context=MAX_CONTEXT)
    return str(budget_for_slots(survey_checkpoint(str(path), config.dtype), config, slots))


def server_args(path: Path, *extra: str) -> list[str]:
    common = ["--vram-budget", budget(path), "--device", "cpu", "--max-context", str(MAX_CONTEXT)]
    return ["--model", str(path), *common, "--max-new-tokens", "16", "--log-level", "warning", *extra]


@pytest.fixture(scope="module")
def server(chat_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """With an API key and a model name; queue of 8."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    args = server_args(
        chat_checkpoint, "--api-key", API_KEY, "--served-model-name", MODEL, "--queue-size", "8"
    )
    with ServerProcess(args, log) as process:
        yield process


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
