"""Prometheus metrics for /metrics, in a registry of the app's own (two apps in one process never clash).

Read at scrape time: the runtime's counters from ``offload.stats(model)`` (expert hits and misses, the hit
rate, bytes copied, copy and stall time, prefetch; the disk tier's reads and host-slot hits when it is on),
and the engine's (queue depth, requests, tokens, tokens/s).
Counted as requests pass: every HTTP request by endpoint and status, and its duration (a streamed request
lasts until its last event).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from offload.offload_stats import OffloadStats
from offload.server.engine import Engine

ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class _Live(Collector):
    """Metrics read from the engine and the runtime when Prometheus scrapes."""

    def __init__(self, engine: Engine, stats: Callable[[], OffloadStats]) -> None:
        self._engine = engine
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        e = self._engine
        c = e.snapshot()

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"offload_{name}", doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"offload_{name}", doc, value=value)

        yield gauge("queue_depth", "requests waiting behind the running one", e.queue_depth)
        yield gauge("requests_running", "requests generating now (0 or 1)", int(e.busy))
        yield counter("requests_completed", "generations that ran to the end", c.completed)
        yield counter(
            "requests_cancelled", "generations stopped or dropped: the client went away", c.cancelled
        )
        yield counter("requests_failed", "generations that raised", c.failed)
        yield counter("prompt_tokens", "prompt tokens of finished generations", c.prompt_tokens)
        yield counter("completion_tokens", "tokens generated", c.completion_tokens)
        yield counter("generation_seconds", "time spent in generate", c.generation_seconds)
        yield counter("queue_wait_seconds", "time generations waited in the queue", c.queue_seconds)
        yield gauge(
            "tokens_per_second",
            "generated tokens per second of the last finished request",
            c.last_tokens_per_s,
        )
        s = self._stats()
        yield gauge("expert_hit_rate", "expert uses served from a resident slot, of all uses", s.hit_rate)
        yield counter("expert_hits", "expert uses served from a resident slot", s.expert_hits)
        yield counter("expert_misses", "expert uses that waited for a copy (demand misses)", s.expert_misses)
        yield counter("bytes_copied", "expert bytes copied from host to device", s.bytes_host_to_device)
        yield counter("copy_seconds", "time spent copying experts", s.copy_seconds)
        yield counter("stall_seconds", "time compute waited for copies", s.stall_seconds)
        yield counter("expert_evictions", "experts evicted from a slot", s.evictions)
        yield counter("prefetch_issued", "experts copied ahead of their layer", s.prefetch_issued)
        yield counter("prefetch_used", "prefetched experts used, landed in time", s.prefetch_used)
        yield counter("prefetch_wasted", "prefetched experts evicted unused", s.prefetch_wasted)
        yield gauge("expert_slots", "expert slots on the device", s.slots)
        yield gauge("experts", "routed experts of the model", s.total_experts)
        yield gauge("vram_budget_bytes", "the device memory budget", s.budget_bytes)
        if s.peak_device_bytes is not None:
            yield gauge("peak_device_bytes", "peak device memory allocated since load", s.peak_device_bytes)
        if s.host_tier_slots:  # the disk tier: experts on disk under a cache of host slots
            yield gauge("host_tier_slots", "host slots the disk tier keeps experts in", s.host_tier_slots)
            yield counter("host_tier_hits", "copies whose expert was in a host slot", s.host_tier_hits)
            yield counter("host_tier_misses", "copies whose expert was read from disk", s.host_tier_misses)
            yield counter(
                "host_tier_read_ahead", "experts read before their copy was issued", s.host_tier_read_ahead
            )
            yield counter("disk_reads", "experts read from disk", s.disk_reads)
            yield counter("disk_bytes", "bytes read from disk", s.disk_bytes)
            yield counter("disk_seconds", "time with a disk read in flight", s.disk_seconds)


class ServerMetrics:
    def __init__(self, engine: Engine, stats: Callable[[], OffloadStats]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "offload_http_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "offload_http_request_duration_seconds",
            "HTTP request time, to the last byte of a stream",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_Live(engine, stats))

    def observe(self, path: str, status: int, seconds: float) -> None:
        endpoint = path if path in ENDPOINTS or path.startswith("/v1/models/") else "other"
        endpoint = "/v1/models" if endpoint.startswith("/v1/models/") else endpoint
        self.requests.labels(endpoint, str(status)).inc()
        self.duration.labels(endpoint).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class CountRequests:
    """ASGI middleware that counts every HTTP response, errors included. Plain ASGI rather than Starlette's
    BaseHTTPMiddleware, which would get between a streaming response and the client's disconnect."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # if the app fails before it answers
        start = time.perf_counter()

        async def sending(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.observe(scope.get("path", ""), status, time.perf_counter() - start)
