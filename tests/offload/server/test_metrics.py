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


def test_the_disk_tier_s_counters_are_exported_when_it_is_on() -> None:
    """Read from offload.stats at scrape time: present with the disk tier, absent without it."""
    from types import SimpleNamespace

    from prometheus_client import generate_latest

    from offload.offload_stats import OffloadStats
    from offload.server.engine import EngineCounters
    from offload.server.metrics import ServerMetrics

    engine = SimpleNamespace(snapshot=EngineCounters, queue_depth=0, busy=False)
    base = dict(expert_hits=5, expert_misses=3, bytes_host_to_device=1, copy_seconds=0.1, slots=2,
                total_experts=8, budget_bytes=1, planned_bytes=1, peak_device_bytes=None, layer_calls=1,
                waves=1, evictions=0)  # fmt: skip
    tier = dict(host_tier_slots=4, host_tier_hits=2, host_tier_misses=1, host_tier_read_ahead=1,
                disk_reads=2, disk_bytes=8192, disk_seconds=0.25)  # fmt: skip
    for fields, present in ((base, False), ({**base, **tier}, True)):
        metrics = ServerMetrics(engine, lambda fields=fields: OffloadStats(**fields))  # type: ignore[arg-type]
        text = generate_latest(metrics.registry).decode()
        families = {f.name: f.samples for f in text_string_to_metric_families(text)}
        assert ("offload_disk_reads" in families) is present
        if present:
            assert value(families, "offload_disk_bytes_total") == 8192
            assert value(families, "offload_host_tier_slots") == 4
            assert value(families, "offload_host_tier_misses_total") == 1
