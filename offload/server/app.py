"""The FastAPI app: one handler per endpoint, each thin: check, prepare, queue, answer.

    GET  /health                 liveness, queue depth
    GET  /metrics                Prometheus text
    GET  /v1/models              the one model served (and /v1/models/{id})
    POST /v1/completions         a prompt, streamed or not
    POST /v1/chat/completions    messages through the tokenizer's chat template, streamed or not

With an API key, every /v1 request must send ``Authorization: Bearer KEY`` (401 otherwise); /health and
/metrics stay open, for probes and scrapers on the same machine.
"""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response

from offload.hf.generation import Generated
from offload.offload_stats import OffloadStats
from offload.server import prompts, streaming
from offload.server.engine import Engine, EngineClosed, Job, QueueFull
from offload.server.errors import APIError, install_error_handlers
from offload.server.metrics import CountRequests, ServerMetrics
from offload.server.prompts import Defaults, Prepared
from offload.server.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Health,
    ModelCard,
    ModelList,
)

DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks that its client is still there


def create_app(
    engine: Engine,
    stats: Callable[[], OffloadStats],
    *,
    api_key: str | None = None,
    defaults: Defaults | None = None,
) -> FastAPI:
    """The app around a loaded model's engine; its lifespan starts and stops the engine's worker."""
    defaults = defaults or Defaults()
    metrics = ServerMetrics(engine, stats)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="moe-offload", lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(CountRequests, metrics=metrics)
    authorized = Depends(_key_check(api_key))

    @app.get("/health")
    async def health() -> Health:
        return Health(model=engine.model_name, queue_depth=engine.queue_depth, running=engine.busy)

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", dependencies=[authorized])
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=engine.model_name, created=created)])

    @app.get("/v1/models/{model_id:path}", dependencies=[authorized])
    async def model(model_id: str) -> ModelCard:
        prompts.check_model(engine, model_id)
        return ModelCard(id=engine.model_name, created=created)

    @app.post("/v1/completions", dependencies=[authorized], response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        prompts.check_model(engine, body.model)
        prepared = prompts.completion_prompt(engine, body, defaults)
        job = _submit(engine, prepared, body.stream)
        id, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            events = streaming.completion_events(
                job, id=id, created=now, model=body.model, include_usage=usage
            )
            return streaming.JobStream(events, job, engine.cancel)
        result = await _wait(engine, job, request.is_disconnected)
        return Completion(
            id=id,
            created=now,
            model=body.model,
            choices=[CompletionChoice(text=result.text, finish_reason=result.finish_reason)],
            usage=streaming.usage_of(result),
        )

    @app.post("/v1/chat/completions", dependencies=[authorized], response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        prompts.check_model(engine, body.model)
        prepared = prompts.chat_prompt(engine, body, defaults)
        job = _submit(engine, prepared, body.stream)
        id, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            events = streaming.chat_events(job, id=id, created=now, model=body.model, include_usage=usage)
            return streaming.JobStream(events, job, engine.cancel)
        result = await _wait(engine, job, request.is_disconnected)
        return ChatCompletion(
            id=id,
            created=now,
            model=body.model,
            choices=[
                ChatChoice(message=AssistantMessage(content=result.text), finish_reason=result.finish_reason)
            ],
            usage=streaming.usage_of(result),
        )

    return app


def _key_check(api_key: str | None) -> Callable[[Request], Awaitable[None]]:
    async def check(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise APIError(401, "missing API key: send Authorization: Bearer KEY", code="invalid_api_key")
        if not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "incorrect API key", code="invalid_api_key")

    return check


def _submit(engine: Engine, prepared: Prepared, stream: bool) -> Job:
    try:
        return engine.submit(prepared.inputs, prepared.sampling, stream)
    except QueueFull as exc:
        raise APIError(
            429,
            f"the server is busy: {exc}; retry later",
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": "1"},
        ) from None
    except EngineClosed as exc:
        raise APIError(503, str(exc), type="server_error", code="shutting_down") from None


async def _wait(engine: Engine, job: Job, disconnected: Callable[[], Awaitable[bool]]) -> Generated:
    """The job's result. A non-streamed request has no stream for Starlette to cancel, so it checks on its
    client while it waits, and cancels the job if the client has gone."""
    try:
        while True:
            try:
                kind, value = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await disconnected():
                    engine.cancel(job)
                    raise APIError(499, "the client closed the request", code="client_closed") from None
                continue
            if kind == "done":
                if value.finish_reason == "cancelled":
                    raise APIError(
                        503, "the server is shutting down", type="server_error", code="shutting_down"
                    )
                return value
            if kind == "error":
                if isinstance(value, EngineClosed):
                    raise APIError(503, str(value), type="server_error", code="shutting_down")
                raise APIError(
                    500,
                    f"generation failed: {type(value).__name__}",
                    type="server_error",
                    code="internal_error",
                )
    finally:
        engine.cancel(job)
