"""The one model and its one expert cache, serving one request at a time in arrival order.

Handlers submit jobs from the event loop; a single worker thread runs ``generate`` for each in turn (the
runtime's cache and copy engine belong to one forward at a time, and torch's generator to one request).
Jobs wait in a bounded FIFO: when ``queue_size`` jobs are already waiting behind the running one,
:meth:`Engine.submit` raises :class:`QueueFull` (a 429). Each job's text reaches its handler through an
asyncio queue, one event per piece. :meth:`Engine.cancel` drops a waiting job or stops a running one at its
next token: the handlers call it when the client disconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from offload.hf.generation import Generated, Sampling, stream_generate

log = logging.getLogger("offload.server")

EventKind = Literal["text", "done", "error"]


class QueueFull(Exception):
    """Every place in the queue is taken."""


class EngineClosed(Exception):
    """The server is shutting down."""


@dataclass(eq=False)  # jobs compare by identity: the queue removes this one, not an equal one
class Job:
    inputs: Any  # generate's inputs: input_ids and attention_mask, batch of one
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    stream: bool  # send each piece of text as it comes; else only the result
    events: asyncio.Queue[tuple[EventKind, Any]] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = field(default_factory=time.perf_counter)

    def send(self, kind: EventKind, value: Any) -> None:
        """From the worker thread to the handler's event loop."""
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


@dataclass
class EngineCounters:
    """Totals since start-up, for /metrics."""

    completed: int = 0
    cancelled: int = 0  # stopped because the client went away, or dropped while waiting
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    generation_seconds: float = 0.0
    queue_seconds: float = 0.0
    last_tokens_per_s: float = 0.0  # completion tokens / generate time of the last finished request


class Engine:
    def __init__(
        self, model: Any, tokenizer: Any, *, model_name: str, max_context: int, queue_size: int
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_context = max_context
        self.queue_size = queue_size
        self.counters = EngineCounters()
        self._pending: deque[Job] = deque()
        self._running: Job | None = None
        self._closing = False
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        # Handlers encode prompts on the event loop while the worker decodes. A fast tokenizer mutates its
        # Rust state only when its padding or truncation settings change; one encode here settles them, so
        # the concurrent calls afterwards only read.
        tokenizer("warm-up")

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="offload-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new jobs, fail the waiting ones, stop the running one at its next token, and wait."""
        with self._lock:
            self._closing = True
            waiting = list(self._pending)
            self._pending.clear()
            if self._running is not None:
                self._running.cancelled.set()
            self._lock.notify_all()
        for job in waiting:
            job.send("error", EngineClosed("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)

    # -- handlers' side -------------------------------------------------------------------------------
    def submit(self, inputs: Any, sampling: Sampling, stream: bool) -> Job:
        """Queue a job (call from the event loop); QueueFull when ``queue_size`` jobs already wait."""
        job = Job(inputs, sampling, asyncio.get_running_loop(), stream)
        with self._lock:
            if self._closing:
                raise EngineClosed("the server is shutting down")
            # Nothing running and nothing waiting: the job starts at once, whatever the queue size.
            if len(self._pending) >= self.queue_size and (self._running is not None or self._pending):
                raise QueueFull(f"{len(self._pending)} requests are waiting (--queue-size {self.queue_size})")
            self._pending.append(job)
            self._lock.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        """Drop a waiting job or stop a running one at its next token; nothing if it has finished."""
        with self._lock:
            if job.cancelled.is_set():
                return
            job.cancelled.set()
            if job in self._pending:
                self._pending.remove(job)
                self.counters.cancelled += 1

    @property
    def queue_depth(self) -> int:
        """Jobs waiting behind the running one."""
        with self._lock:
            return len(self._pending)

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._running is not None

    def snapshot(self) -> EngineCounters:
        with self._lock:
            return EngineCounters(**vars(self.counters))

    # -- the worker -----------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._closing:
                    self._lock.wait()
                if self._closing:
                    return
                job = self._pending.popleft()
                self._running = job
            try:
                self._run(job)
            finally:
                with self._lock:
                    self._running = None

    def _run(self, job: Job) -> None:
        started = time.perf_counter()
        try:
            result = stream_generate(
                self.model,
                self.tokenizer,
                job.inputs,
                job.sampling,
                on_text=(lambda text: job.send("text", text)) if job.stream else (lambda text: None),
                cancelled=job.cancelled.is_set,
            )
        except Exception as exc:  # a bug, or the device ran out of memory: this request fails, not the server
            log.exception("generation failed")
            with self._lock:
                self.counters.failed += 1
            job.send("error", exc)
            return
        self._count(result, started - job.submitted_at)
        job.send("done", result)

    def _count(self, result: Generated, queued: float) -> None:
        with self._lock:
            c = self.counters
            if result.finish_reason == "cancelled":
                c.cancelled += 1
            else:
                c.completed += 1
            c.prompt_tokens += result.prompt_tokens
            c.completion_tokens += result.completion_tokens
            c.generation_seconds += result.seconds
            c.queue_seconds += queued
            c.last_tokens_per_s = result.tokens_per_s
