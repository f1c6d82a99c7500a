"""A request as prompt tokens and sampling settings, with every check that makes a 400 before it queues:
the model name, unsupported options, an empty prompt, a chat without a template, and the context.

Tokenizing happens here, on the event loop, so a request that cannot fit is refused before it waits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from offload.hf.generation import ChatTemplateError, Sampling, encode_chat, encode_prompt
from offload.server.engine import Engine
from offload.server.errors import APIError
from offload.server.schemas import ChatCompletionRequest, CompletionRequest, GenerationRequest


@dataclass(frozen=True)
class Defaults:
    """What a request that leaves a setting out gets: the command line's --max-new-tokens, --temperature
    (0 decodes greedily, as offload-run does) and --repetition-penalty (1: none)."""

    max_new_tokens: int = 48
    temperature: float = 0.0
    repetition_penalty: float = 1.0


@dataclass(frozen=True)
class Prepared:
    inputs: Any  # generate's inputs, batch of one
    prompt_tokens: int
    sampling: Sampling


def check_model(engine: Engine, name: str) -> None:
    if name != engine.model_name:
        raise APIError(
            404,
            f"the model {name!r} does not exist; this server serves {engine.model_name!r}",
            param="model",
            code="model_not_found",
        )


def completion_prompt(engine: Engine, body: CompletionRequest, defaults: Defaults) -> Prepared:
    _refuse_unsupported(body)
    if body.echo or body.suffix is not None or (body.best_of or 1) > 1:
        raise APIError(400, "echo, suffix and best_of are not supported", param="echo", code="unsupported")
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise APIError(
                400,
                "send one text prompt per request (token-id and batched prompts are not supported)",
                param="prompt",
            )
        prompt = prompt[0]
    inputs = encode_prompt(engine.tokenizer, prompt)
    return _prepared(engine, inputs, body, body.max_tokens, defaults, "prompt")


def chat_prompt(engine: Engine, body: ChatCompletionRequest, defaults: Defaults) -> Prepared:
    _refuse_unsupported(body)
    if body.tools:
        raise APIError(400, "tools are not supported", param="tools", code="unsupported")
    messages = [{"role": m.role, "content": _text(m.content, i)} for i, m in enumerate(body.messages)]
    try:
        inputs = encode_chat(engine.tokenizer, messages)
    except ChatTemplateError as exc:
        raise APIError(400, str(exc), param="messages", code="chat_template") from None
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    return _prepared(engine, inputs, body, max_tokens, defaults, "messages")


def _text(content: Any, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise APIError(
                400,
                f"messages[{index}]: only text content is supported, got a {part.type!r} part",
                param=f"messages.{index}.content",
            )
        texts.append(part.text)
    return "\n".join(texts)


def _refuse_unsupported(body: GenerationRequest) -> None:
    if body.n != 1:
        raise APIError(400, "only n = 1 is supported", param="n", code="unsupported")
    if body.logprobs not in (None, False, 0):
        raise APIError(400, "logprobs are not supported", param="logprobs", code="unsupported")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise APIError(400, f"{name} is not supported (send 0)", param=name, code="unsupported")


def _prepared(
    engine: Engine,
    inputs: Any,
    body: GenerationRequest,
    max_tokens: int | None,
    defaults: Defaults,
    where: str,
) -> Prepared:
    prompt_tokens = int(inputs["input_ids"].shape[1])
    if prompt_tokens == 0:
        raise APIError(400, f"the {where} is empty", param=where)
    room = engine.max_context - prompt_tokens
    if room < 1:
        raise APIError(
            400,
            f"the {where} has {prompt_tokens} tokens, which leaves no room in this server's context of "
            f"{engine.max_context} tokens (--max-context)",
            param=where,
            code="context_length_exceeded",
        )
    if max_tokens is None:
        max_tokens = min(defaults.max_new_tokens, room)
    elif max_tokens > room:
        raise APIError(
            400,
            f"max_tokens {max_tokens} plus the {where}'s {prompt_tokens} tokens is more than this server's "
            f"context of {engine.max_context} tokens (--max-context): ask for at most {room}",
            param="max_tokens",
            code="context_length_exceeded",
        )
    temperature = defaults.temperature if body.temperature is None else body.temperature
    penalty = defaults.repetition_penalty if body.repetition_penalty is None else body.repetition_penalty
    sampling = Sampling(max_tokens, temperature, body.top_p, body.seed, body.stop_strings(), penalty)
    return Prepared(inputs, prompt_tokens, sampling)
