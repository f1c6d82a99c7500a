"""Load test of ``offload-serve``: N concurrent clients streaming completions, latency percentiles and tokens/s.

    python bench/serve_load.py --clients 4 --requests 32 --max-tokens 32 --out bench/results/serve_load.json
    python bench/serve_load.py --url http://127.0.0.1:8000 --api-key KEY     # a server already running

Without ``--url`` it starts its own server (``--server-args``, default the embedded demo) on a free loopback
port and stops it at the end; with ``--url`` the server must be on this machine (loopback only). Bounded:
at most ``--requests`` requests and ``--time-limit`` seconds, whichever comes first. Each client sends its
requests one after another through the official openai client, streamed, so time to first token is measured
too; the server runs one request at a time, so latency grows with the clients (queueing), while tokens/s
shows what the one model delivers. Reports p50/p90/p99 of latency and time to first token, tokens/s over the
wall time, refused (429) and failed requests, and the server's expert counters from /metrics.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shlex
import sys
import tempfile
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

PROMPTS = [
    "Offloading experts to host memory lets a small GPU",
    "The router of a mixture-of-experts layer picks",
    "Copying one expert over PCIe takes",
    "A cache of expert slots on the device",
]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url", help="a running server (loopback only), e.g. http://127.0.0.1:8000; default: start one"
    )
    p.add_argument(
        "--server-args", default="", help="offload-serve options for the server it starts (default: the demo)"
    )
    p.add_argument("--model", help="model name to request (default: the first of /v1/models)")
    p.add_argument("--api-key", default="none", help="API key, if the server wants one")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    p.add_argument("--requests", type=int, default=32, help="requests in all (default 32)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per request (default 32)")
    p.add_argument(
        "--time-limit", type=float, default=600.0, help="stop issuing requests after this many seconds"
    )
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--note", default="", help="free text stored with the results (what machine, what model)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="serve_load", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    add_arguments(parser)
    given = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(given)
    if min(args.clients, args.requests, args.max_tokens) < 1 or args.time_limit <= 0:
        parser.error("--clients, --requests, --max-tokens and --time-limit must be positive")
    if args.url is not None and urllib.parse.urlparse(args.url).hostname not in LOOPBACK:
        parser.error(
            f"--url must be a loopback address ({', '.join(sorted(LOOPBACK))}): this test stays on this machine"
        )
    if args.url is not None:
        result = run(args, args.url.rstrip("/"))
    else:
        from offload_bench.serve_process import ServerProcess

        with (
            tempfile.TemporaryDirectory() as tmp,
            ServerProcess(shlex.split(args.server_args), Path(tmp) / "server.log") as server,
        ):
            result = run(args, server.url)
    result["command"] = "python bench/serve_load.py " + shlex.join(given)
    print(summary(result))
    if args.out is not None:
        write(args.out, result)
        print(f"wrote {args.out}")
    return 0


def run(args: argparse.Namespace, url: str) -> dict[str, Any]:
    import httpx
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=args.api_key, max_retries=0, timeout=args.time_limit)
    model = args.model or client.models.list().data[0].id
    issued = 0
    lock = threading.Lock()
    records: list[dict[str, Any]] = []
    start = time.perf_counter()
    deadline = start + args.time_limit

    def next_request() -> int | None:
        nonlocal issued
        with lock:
            if issued >= args.requests or time.perf_counter() >= deadline:
                return None
            issued += 1
            return issued - 1

    def client_loop(worker: int) -> None:
        own = openai.OpenAI(
            base_url=f"{url}/v1", api_key=args.api_key, max_retries=0, timeout=args.time_limit
        )
        while (i := next_request()) is not None:
            records.append(one_request(own, model, PROMPTS[i % len(PROMPTS)], args.max_tokens, worker))

    with ThreadPoolExecutor(args.clients) as pool:
        list(pool.map(client_loop, range(args.clients)))
    wall = time.perf_counter() - start
    metrics = httpx.get(f"{url}/metrics", timeout=30).text
    return report(args, model, records, wall, metrics)


def one_request(client: Any, model: str, prompt: str, max_tokens: int, worker: int) -> dict[str, Any]:
    import openai

    sent = time.perf_counter()
    first: float | None = None
    tokens = 0
    try:
        stream = client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].text:
                first = time.perf_counter()
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except openai.RateLimitError:
        return {"worker": worker, "status": "refused"}
    except openai.OpenAIError as exc:
        return {"worker": worker, "status": "failed", "error": f"{type(exc).__name__}: {exc}"[:200]}
    done = time.perf_counter()
    return {
        "worker": worker,
        "status": "ok",
        "latency_s": done - sent,
        "ttft_s": (first or done) - sent,
        "completion_tokens": tokens,
    }


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(np.mean(values))}


def report(
    args: argparse.Namespace, model: str, records: list[dict[str, Any]], wall: float, metrics: str
) -> dict[str, Any]:
    from prometheus_client.parser import text_string_to_metric_families

    ok = [r for r in records if r["status"] == "ok"]
    tokens = sum(r["completion_tokens"] for r in ok)
    server = {
        s.name: s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
        if s.name
        in (
            "offload_expert_hit_rate",
            "offload_expert_hits_total",
            "offload_expert_misses_total",
            "offload_bytes_copied_total",
            "offload_expert_slots",
            "offload_experts",
            "offload_completion_tokens_total",
            "offload_generation_seconds_total",
        )
    }
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "note": args.note,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "model": model,
        "clients": args.clients,
        "requests_asked": args.requests,
        "max_tokens": args.max_tokens,
        "time_limit_s": args.time_limit,
        "requests": {
            "ok": len(ok),
            "refused_429": sum(r["status"] == "refused" for r in records),
            "failed": sum(r["status"] == "failed" for r in records),
        },
        "wall_s": wall,
        "completion_tokens": tokens,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "requests_per_s": len(ok) / wall if wall > 0 else 0.0,
        "latency_s": percentiles([r["latency_s"] for r in ok]),
        "ttft_s": percentiles([r["ttft_s"] for r in ok]),
        "server_metrics": server,
        "errors": sorted({r["error"] for r in records if r["status"] == "failed"})[:5],
    }


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def summary(r: dict[str, Any]) -> str:
    def ms(p: dict[str, float | None]) -> str:
        return ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in p.items() if v is not None and k != "mean")

    return "\n".join(
        [
            f"{r['requests']['ok']} requests ok, {r['requests']['refused_429']} refused (429), {r['requests']['failed']} failed; "
            f"{r['clients']} clients, {r['max_tokens']} tokens each, {r['wall_s']:.1f} s",
            f"tokens/s : {r['tokens_per_s']:.2f} ({r['completion_tokens']} tokens)",
            f"latency  : {ms(r['latency_s'])}",
            f"first tok: {ms(r['ttft_s'])}",
        ]
    )


def write(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(payload, fh, indent=2, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, path)
