"""/metrics in Prometheus text, parsed: the runtime's expert counters, tokens/s, requests and queue depth."""

from __future__ import annotations

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from offload_bench.serve_process import ServerProcess
from tests.offload.server.conftest import MODEL


def scrape(url: str) -> dict[str, list]:
    response = httpx.get(f"{url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {f.name: f.samples for f in text_string_to_metric_families(response.text)}


def value(families: dict[str, list], name: str, **labels: str) -> float:
    """One sample by its full name (a counter's ``_total``, a histogram's ``_count``), in any family."""
    matches = [
        s.value
        for samples in families.values()
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(matches) == 1, (name, labels, sorted(families))
    return matches[0]


def test_metrics_after_requests(server: ServerProcess, client: openai.OpenAI) -> None:
    client.completions.create(model=MODEL, prompt="Hello", max_tokens=6)
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=6)
    m = scrape(server.url)
    assert 0.0 <= value(m, "offload_expert_hit_rate") <= 1.0
    hits, misses = value(m, "offload_expert_hits_total"), value(m, "offload_expert_misses_total")
    assert hits > 0 and misses > 0  # 6 slots of 24 experts
    assert value(m, "offload_bytes_copied_total") > 0
    assert value(m, "offload_expert_slots") == 6 and value(m, "offload_experts") == 24
    assert value(m, "offload_tokens_per_second") > 0
    assert value(m, "offload_completion_tokens_total") >= 12
    assert value(m, "offload_requests_completed_total") >= 2
    assert value(m, "offload_queue_depth") == 0
    assert value(m, "offload_http_requests_total", endpoint="/v1/completions", status="200") >= 1
    assert value(m, "offload_http_requests_total", endpoint="/v1/chat/completions", status="200") >= 1
    assert value(m, "offload_http_request_duration_seconds_count", endpoint="/v1/completions") >= 1


def test_health(server: ServerProcess) -> None:
    body = httpx.get(f"{server.url}/health").json()
    assert body == {"status": "ok", "model": MODEL, "queue_depth": 0, "running": False}
