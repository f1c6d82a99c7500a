"""Streamed generation: the pieces add up to the text, stop strings cut it and never leak, greedy tokens are
the unmodified generate's, and a cancel stops it at the next token."""

from __future__ import annotations

import pytest
import torch
import transformers

from offload.hf.generation import (
    ChatTemplateError,
    Sampling,
    encode_chat,
    encode_prompt,
    first_stop,
    held_back,
    stream_generate,
)
from tests.byte_tokenizer import CHAT_TEMPLATE, byte_tokenizer
from tests.conftest import TINY_ARCHS, save_tiny


@pytest.mark.parametrize(
    ("text", "stop", "held"),
    [
        ("hello wor", ["world"], 3),
        ("hello", ["world"], 0),
        ("hello w", ["xyz", "wo"], 1),
        ("abc\ufffd", [], 1),  # half a character
        ("abcab", ["abd", "bx"], 2),  # the longest prefix wins
        ("worl", ["world"], 4),  # at most len(stop) - 1: a whole stop is first_stop's business
    ],
)
def test_held_back(text: str, stop: list[str], held: int) -> None:
    assert held_back(text, stop) == held


def test_first_stop() -> None:
    assert first_stop("one two three", ["three", "two"]) == 4
    assert first_stop("one", ["x"]) is None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[transformers.PreTrainedModel, object]:
    directory = tmp_path_factory.mktemp("gen") / "mixtral"
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    config = TINY_ARCHS["mixtral"]()
    config.vocab_size = len(tokenizer)
    save_tiny(config, directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    printable = torch.tensor([tokenizer.encode(chr(c))[0] for c in range(32, 127)])
    keep = torch.zeros(len(tokenizer), dtype=torch.bool)
    keep[printable] = True
    with torch.no_grad():
        model.lm_head.weight[~keep] = 0  # readable output that never ends early
    return model, tokenizer


def run(tiny, prompt: str, **sampling) -> tuple[list[str], object]:
    model, tokenizer = tiny
    pieces: list[str] = []
    result = stream_generate(
        model, tokenizer, encode_prompt(tokenizer, prompt), Sampling(**sampling), pieces.append
    )
    return pieces, result


def test_greedy_tokens_are_generates_and_pieces_add_up(tiny) -> None:
    model, tokenizer = tiny
    inputs = encode_prompt(tokenizer, "hello")
    expected = model.generate(**inputs, max_new_tokens=12, do_sample=False)[0, 5:]
    pieces, result = run(tiny, "hello", max_new_tokens=12)
    assert result.text == tokenizer.decode(expected, skip_special_tokens=True)
    assert "".join(pieces) == result.text and len(pieces) > 1
    assert (result.prompt_tokens, result.completion_tokens, result.finish_reason) == (5, 12, "length")


def test_repetition_penalty_is_generates(tiny) -> None:
    model, tokenizer = tiny
    inputs = encode_prompt(tokenizer, "hello")
    expected = model.generate(**inputs, max_new_tokens=12, do_sample=False, repetition_penalty=1.5)[0, 5:]
    _, result = run(tiny, "hello", max_new_tokens=12, repetition_penalty=1.5)
    assert result.text == tokenizer.decode(expected, skip_special_tokens=True)


def test_stop_string_cuts_and_never_leaks(tiny) -> None:
    _, full = run(tiny, "hello", max_new_tokens=16)
    stop = full.text[7:10]
    pieces, result = run(tiny, "hello", max_new_tokens=16, stop=(stop,))
    assert result.text == full.text[: full.text.find(stop)]
    assert "".join(pieces) == result.text
    assert result.finish_reason == "stop" and result.completion_tokens < 16


def test_cancel_stops_at_the_next_token(tiny) -> None:
    model, tokenizer = tiny
    pieces: list[str] = []
    result = stream_generate(
        model,
        tokenizer,
        encode_prompt(tokenizer, "hi"),
        Sampling(50),
        pieces.append,
        cancelled=lambda: bool(pieces),
    )
    assert result.finish_reason == "cancelled" and result.completion_tokens <= 3


def test_seed_repeats_sampling(tiny) -> None:
    first = run(tiny, "hello", max_new_tokens=10, temperature=1.0, seed=3)[1].text
    assert run(tiny, "hello", max_new_tokens=10, temperature=1.0, seed=3)[1].text == first


def test_chat_template(tiny) -> None:
    _, tokenizer = tiny
    ids = encode_chat(tokenizer, [{"role": "user", "content": "hi"}])["input_ids"][0].tolist()
    assert tokenizer.decode(ids) == "<s>user\nhi</s>\n<s>assistant\n"
    plain = byte_tokenizer()
    with pytest.raises(ChatTemplateError, match="no chat template"):
        encode_chat(plain, [{"role": "user", "content": "hi"}])
    plain.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        encode_chat(plain, [{"role": "user", "content": "hi"}])
