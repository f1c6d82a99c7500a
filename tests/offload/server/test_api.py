"""The API through the official openai client: models, completions and chat, streamed and not, stop strings,
seeded sampling, four concurrent clients; greedy output equal to offload-run's."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from offload.cli.run import main as offload_run
from offload_bench.serve_process import ServerProcess
from tests.offload.server.conftest import MAX_CONTEXT, MODEL, budget

PROMPTS = ["Hello", "The experts", "MoE offloading is", "a"]


def complete(client: openai.OpenAI, prompt: str, **options) -> openai.types.Completion:
    return client.completions.create(model=MODEL, prompt=prompt, **options)


def streamed_text(stream) -> tuple[str, list]:
    chunks = list(stream)
    return "".join(c.choices[0].text for c in chunks if c.choices), chunks


def test_models(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model"
    assert client.models.retrieve(MODEL).id == MODEL


def test_completion_has_max_tokens_and_usage(client: openai.OpenAI) -> None:
    out = complete(client, "Hello", max_tokens=12)
    assert out.object == "text_completion" and out.model == MODEL
    choice = out.choices[0]
    assert choice.finish_reason == "length"
    assert len(choice.text) == 12  # one printable byte per token
    assert out.usage.prompt_tokens == 5  # one byte, one token
    assert out.usage.completion_tokens == 12
    assert out.usage.total_tokens == 17


def test_default_max_tokens_is_max_new_tokens(client: openai.OpenAI) -> None:
    assert complete(client, "Hello").usage.completion_tokens == 16  # --max-new-tokens 16


def test_greedy_is_deterministic_and_streams_the_same_text(client: openai.OpenAI) -> None:
    first = complete(client, "The experts", max_tokens=10).choices[0].text
    assert complete(client, "The experts", max_tokens=10, temperature=0).choices[0].text == first
    text, chunks = streamed_text(
        complete(client, "The experts", max_tokens=10, stream=True, stream_options={"include_usage": True})
    )
    assert text == first
    assert len([c for c in chunks if c.choices and c.choices[0].text]) >= 2  # token by token
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10 and not chunks[-1].choices


def test_chat_uses_the_template(client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert len(out.choices[0].message.content) == 8
    # "<s>system\nBe brief.</s>\n<s>user\nhi</s>\n<s>assistant\n": 5 special tokens, one token a byte
    assert out.usage.prompt_tokens == 5 + len("system\nBe brief.\nuser\nhi\nassistant\n")
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_chat_accepts_text_parts_and_max_completion_tokens(client: openai.OpenAI) -> None:
    parts = [{"type": "text", "text": "hi"}]
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": parts}], max_completion_tokens=3
    )
    plain = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert out.choices[0].message.content == plain.choices[0].message.content
    assert out.usage.completion_tokens == 3


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_cut_the_text(client: openai.OpenAI, stream: bool) -> None:
    full = complete(client, "MoE offloading is", max_tokens=16).choices[0].text
    stop = full[6:9]
    expected = full[: full.find(stop)]
    if stream:
        text, chunks = streamed_text(
            complete(client, "MoE offloading is", max_tokens=16, stop=[stop, "\x7f"], stream=True)
        )
        reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    else:
        out = complete(client, "MoE offloading is", max_tokens=16, stop=stop)
        text, reason = out.choices[0].text, out.choices[0].finish_reason
        assert out.usage.completion_tokens < 16
    assert text == expected
    assert reason == "stop"


def test_seeded_sampling_repeats(client: openai.OpenAI) -> None:
    options = dict(max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    first = complete(client, "Hello", **options).choices[0].text
    assert complete(client, "Hello", **options).choices[0].text == first
    assert len(first) == 12


def test_four_concurrent_clients_get_the_sequential_answers(server: ServerProcess) -> None:
    clients = [
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="test-key", max_retries=0) for _ in range(4)
    ]
    sequential = [complete(clients[0], p, max_tokens=8).choices[0].text for p in PROMPTS]

    def ask(i: int) -> str:
        if i % 2:
            return streamed_text(complete(clients[i], PROMPTS[i], max_tokens=8, stream=True))[0]
        return complete(clients[i], PROMPTS[i], max_tokens=8).choices[0].text

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(ask, range(4))) == sequential


def test_greedy_output_equals_offload_run(
    chat_checkpoint: Path, client: openai.OpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same checkpoint, budget and prompt through offload-run: the same text."""
    argv = ["--model", str(chat_checkpoint), "--vram-budget", budget(chat_checkpoint), "--device", "cpu"]
    capsys.readouterr()
    code = offload_run(
        [*argv, "--max-context", str(MAX_CONTEXT), "--prompt", "Hello", "--max-new-tokens", "20"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert out.endswith("\n")
    assert complete(client, "Hello", max_tokens=20).choices[0].text == out[:-1]
