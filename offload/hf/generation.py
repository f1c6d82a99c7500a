"""Text in, text out through transformers: a checkpoint's tokenizer, and a timed, streamed ``generate``."""

from __future__ import annotations

import time
from typing import Any

import torch
from transformers import AutoTokenizer, TextStreamer

from offload.errors import OffloadError
from offload.hf.checkpoint import resolve

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


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
    sampling: dict[str, Any] = (
        {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    )
    if repetition_penalty != 1.0:
        sampling["repetition_penalty"] = repetition_penalty
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, streamer=streamer, **sampling)
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
