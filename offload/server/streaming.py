"""Server-sent events in OpenAI's chunk format: ``data: {json}`` per piece of text, a last chunk with the
finish reason (and one with the token counts when ``stream_options.include_usage`` asks), then
``data: [DONE]``. A failure after the stream has started is an error event, as OpenAI sends it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from pydantic import BaseModel
from starlette.responses import StreamingResponse

from offload.hf.generation import Generated
from offload.server.engine import EngineClosed, Job
from offload.server.errors import error_body
from offload.server.schemas import (
    ChatChunkChoice,
    ChatCompletionChunk,
    Completion,
    CompletionChoice,
    Delta,
    Usage,
)

DONE = "data: [DONE]\n\n"


def event(payload: BaseModel | dict[str, Any]) -> str:
    data = payload.model_dump() if isinstance(payload, BaseModel) else payload
    # As OpenAI sends them: a delta has only the fields it sets, and usage only where it is counted.
    for choice in data.get("choices", []):
        if "delta" in choice:
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
    if data.get("usage", 0) is None:
        del data["usage"]
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def usage_of(result: Generated) -> Usage:
    return Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        total_tokens=result.prompt_tokens + result.completion_tokens,
    )


def failure_event(exc: BaseException) -> str:
    if isinstance(exc, EngineClosed):
        return event(error_body(str(exc), "server_error", code="shutting_down"))
    return event(
        error_body(f"generation failed: {type(exc).__name__}", "server_error", code="internal_error")
    )


async def _events(
    job: Job,
    include_usage: bool,
    opening: BaseModel | None,
    text_chunk: Callable[[str], BaseModel],
    last_chunk: Callable[[str], BaseModel],
    usage_chunk: Callable[[Usage], BaseModel],
) -> AsyncIterator[str]:
    if opening is not None:
        yield event(opening)
    while True:
        kind, value = await job.events.get()
        if kind == "text":
            yield event(text_chunk(value))
        elif kind == "done":
            yield event(last_chunk(value.finish_reason))
            if include_usage:
                yield event(usage_chunk(usage_of(value)))
            break
        else:
            yield failure_event(value)
            break
    yield DONE


class JobStream(StreamingResponse):
    """The events of one job. However the response ends (done, or the client went away and Starlette
    cancelled it, even before the first event), the job is cancelled: a no-op once it has finished."""

    def __init__(self, content: AsyncIterator[str], job: Job, cancel: Callable[[Job], None]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._job = job
        self._cancel = cancel

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._cancel(self._job)


def completion_events(
    job: Job, *, id: str, created: int, model: str, include_usage: bool
) -> AsyncIterator[str]:
    def chunk(text: str, reason: str | None = None) -> Completion:
        return Completion(
            id=id, created=created, model=model, choices=[CompletionChoice(text=text, finish_reason=reason)]
        )

    return _events(
        job,
        include_usage,
        None,
        text_chunk=chunk,
        last_chunk=lambda reason: chunk("", reason),
        usage_chunk=lambda usage: Completion(id=id, created=created, model=model, choices=[], usage=usage),
    )


def chat_events(job: Job, *, id: str, created: int, model: str, include_usage: bool) -> AsyncIterator[str]:
    def chunk(delta: Delta, reason: str | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=id,
            created=created,
            model=model,
            choices=[ChatChunkChoice(delta=delta, finish_reason=reason)],
        )

    return _events(
        job,
        include_usage,
        chunk(Delta(role="assistant", content="")),  # OpenAI opens with the role
        text_chunk=lambda text: chunk(Delta(content=text)),
        last_chunk=lambda reason: chunk(Delta(), reason),
        usage_chunk=lambda usage: ChatCompletionChunk(
            id=id, created=created, model=model, choices=[], usage=usage
        ),
    )
