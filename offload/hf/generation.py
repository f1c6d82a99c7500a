"""Text in, text out through transformers: a checkpoint's tokenizer, prompts and chats as token ids, and
``generate`` timed (offload-run) or streamed with stop strings and cancellation (offload-serve).

Both commands encode a prompt with :func:`encode_prompt` and pass :func:`sampling_kwargs` to ``generate``, so
a greedy request to the server produces exactly the tokens ``offload-run`` prints for the same prompt.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoTokenizer, StoppingCriteria, StoppingCriteriaList, TextStreamer

from offload.errors import OffloadError
from offload.hf.checkpoint import resolve

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class ChatTemplateError(OffloadError):
    """The tokenizer has no chat template, or its template rejects the conversation."""


def load_tokenizer(model_path: str) -> Any:
    """The checkpoint's own tokenizer, local files only and no remote code; OffloadError if it has none."""
    directory = resolve(model_path).directory
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise OffloadError(f"checkpoint {directory} has no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(directory, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OffloadError(f"cannot load the tokenizer of {directory}: {first_line}") from None


def encode_prompt(tokenizer: Any, prompt: str) -> Any:
    """A plain prompt as ``generate`` inputs (``input_ids`` and ``attention_mask``, batch of one), with the
    tokenizer's own special tokens: what offload-run and the server's completions both use."""
    return tokenizer(prompt, return_tensors="pt")


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_chat(tokenizer: Any, messages: Sequence[dict[str, str]]) -> Any:
    """A conversation rendered by the tokenizer's chat template, ready for the assistant's reply.

    The template writes the special tokens itself, so the text is not given the tokenizer's special tokens
    again (transformers' ``apply_chat_template`` takes care of that)."""
    if not has_chat_template(tokenizer):
        raise ChatTemplateError(
            "this model's tokenizer has no chat template: use /v1/completions with a plain prompt"
        )
    try:
        return tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
    except Exception as exc:  # jinja2 errors, or a template's own raise_exception: the conversation is bad
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ChatTemplateError(f"the chat template rejected the messages: {message}") from None


def sampling_kwargs(
    temperature: float, top_p: float | None = None, repetition_penalty: float = 1.0
) -> dict[str, Any]:
    """``generate`` arguments: greedy at temperature 0, else sampling (``top_p`` only when given, so the
    model's generation config keeps its own default); a repetition penalty other than 1 divides the logits of
    tokens already in the text (transformers' CTRL-style penalty, before greedy choice or sampling)."""
    kwargs: dict[str, Any] = {"do_sample": False}
    if temperature > 0:
        kwargs = {
            "do_sample": True,
            "temperature": temperature,
            **({} if top_p is None else {"top_p": top_p}),
        }
    if repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = repetition_penalty
    return kwargs


class TimedStreamer:
    """Prints decoded text to stdout as it arrives and timestamps the first generated token (the end of
    prefill)."""

    def __init__(self, tokenizer: Any) -> None:
        self._text = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._calls = 0
        self.first_token_at: float | None = None

    def put(self, value: Any) -> None:
        self._calls += 1
        if self._calls == 2:  # call 1 is the prompt, call 2 the token the prefill produced
            self.first_token_at = time.perf_counter()
        self._text.put(value)

    def end(self) -> None:
        self._text.end()


def generate_timed(
    model: Any,
    tokenizer: Any,
    inputs: Any,
    max_new_tokens: int,
    temperature: float = 0.0,
    repetition_penalty: float = 1.0,
) -> dict[str, Any]:
    """``model.generate`` streamed to stdout (greedy at temperature 0), with prefill and decode timed apart."""
    prompt_tokens = int(inputs["input_ids"].shape[1])
    streamer = TimedStreamer(tokenizer)
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            streamer=streamer,
            **sampling_kwargs(temperature, repetition_penalty=repetition_penalty),
        )
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    end = time.perf_counter()
    new_tokens = int(output.shape[1]) - prompt_tokens
    first = streamer.first_token_at or end
    return {
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "prefill_seconds": first - start,
        "decode_seconds": end - first,
        "prefill_tokens_per_s": prompt_tokens / max(first - start, 1e-9),
        "decode_tokens_per_s": (new_tokens - 1) / (end - first) if new_tokens > 1 and end > first else 0.0,
    }


@dataclass(frozen=True)
class Sampling:
    """One request's generation settings."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float | None = None
    seed: int | None = None  # None: continue the process's random stream
    stop: tuple[str, ...] = ()  # the text ends before the first of these; it is not part of the output
    repetition_penalty: float = 1.0  # 1: none


@dataclass(frozen=True)
class Generated:
    text: str  # the decoded new tokens, cut before a stop string
    prompt_tokens: int
    completion_tokens: int  # tokens generated, the stop string's included
    finish_reason: str  # "stop" (end of sequence or a stop string), "length", or "cancelled"
    seconds: float
    first_token_seconds: float  # until the first new token: prefill and queueing inside generate

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


class _TextStream(StoppingCriteria):
    """Sees every generated token (transformers calls the stopping criteria once per step, after the token
    is appended): decodes the new text, hands on the part that is final, and stops generation at a stop
    string or when ``cancelled()`` says so.

    Text is final when no stop string could still begin in it and it does not end in half a character (a
    byte tokenizer decodes a partial UTF-8 sequence to U+FFFD). The whole new text is decoded each step:
    quadratic in the reply's length, and still far cheaper than a forward pass at the lengths served.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_tokens: int,
        stop: tuple[str, ...],
        on_text: Callable[[str], None],
        cancelled: Callable[[], bool],
    ) -> None:
        self._tokenizer = tokenizer
        self._prompt_tokens = prompt_tokens
        self._stop = tuple(s for s in stop if s)
        self._on_text = on_text
        self._cancelled = cancelled
        self.sent = ""
        self.text: str | None = None  # set when a stop string ended the text
        self.was_cancelled = False
        self.first_token_at: float | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        done = self.text is not None or self._step(input_ids[0, self._prompt_tokens :])
        if self._cancelled():
            self.was_cancelled = done = True
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]

    def _step(self, new_ids: torch.Tensor) -> bool:
        text = self._tokenizer.decode(new_ids, skip_special_tokens=True)
        cut = first_stop(text, self._stop)
        if cut is not None:
            self.text = text[:cut]
            self.send_up_to(self.text)
            return True
        self.send_up_to(text[: len(text) - held_back(text, self._stop)])
        return False

    def send_up_to(self, text: str) -> None:
        # Decoding more tokens can rewrite the tail of earlier text (some tokenizers clean up spaces):
        # nothing is sent unless it extends what was sent.
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self._on_text(text[len(self.sent) :])
            self.sent = text


def first_stop(text: str, stop: Sequence[str]) -> int | None:
    """Where the earliest stop string in ``text`` begins, or None."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


def held_back(text: str, stop: Sequence[str]) -> int:
    """Characters at the end of ``text`` that cannot be sent yet: a proper prefix of a stop string (it may
    complete into one), or a trailing half character."""
    hold = 1 if text.endswith("\ufffd") else 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:n]):
                hold = n
                break
    return hold


def stream_generate(
    model: Any,
    tokenizer: Any,
    inputs: Any,
    sampling: Sampling,
    on_text: Callable[[str], None],
    cancelled: Callable[[], bool] = lambda: False,
) -> Generated:
    """``model.generate`` on one prompt, calling ``on_text`` with each new piece of final text as tokens
    arrive. The pieces add up to ``Generated.text``. Greedy at temperature 0, with the same arguments as
    :func:`generate_timed` (invariant: greedy output equals offload-run's); the stopping criterion only
    watches, it never changes a token."""
    prompt_tokens = int(inputs["input_ids"].shape[1])
    watch = _TextStream(tokenizer, prompt_tokens, sampling.stop, on_text, cancelled)
    if sampling.seed is not None and sampling.temperature > 0:
        torch.manual_seed(sampling.seed)  # one request at a time owns the generator (the server's queue)
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(
            **inputs.to(model.device),
            max_new_tokens=sampling.max_new_tokens,
            stopping_criteria=StoppingCriteriaList([watch]),
            **sampling_kwargs(sampling.temperature, sampling.top_p, sampling.repetition_penalty),
        )
    end = time.perf_counter()
    new_ids = output[0, prompt_tokens:]
    eos = _eos_ids(model)
    if watch.text is not None:
        text, reason = watch.text, "stop"
    else:
        text = tokenizer.decode(new_ids, skip_special_tokens=True)
        ended = len(new_ids) > 0 and int(new_ids[-1]) in eos
        reason = "stop" if ended or len(new_ids) < sampling.max_new_tokens else "length"
    if watch.was_cancelled:
        reason = "cancelled"
    watch.send_up_to(text)  # what was held back and turned out not to start a stop string
    return Generated(
        text=text,
        prompt_tokens=prompt_tokens,
        completion_tokens=len(new_ids),
        finish_reason=reason,
        seconds=end - start,
        first_token_seconds=(watch.first_token_at or end) - start,
    )


def _eos_ids(model: Any) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}
