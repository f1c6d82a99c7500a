"""Every bad request gets an OpenAI-style error object with a 4xx status, and the server lives on: malformed
JSON, schema violations, an unknown model, max_tokens beyond the context, a wrong or missing API key, a chat
without a template, a full queue. A client that disconnects mid-stream stops its generation."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from offload_bench.serve_process import ServerProcess
from tests.offload.server.conftest import API_KEY, MAX_CONTEXT, MODEL, server_args

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def assert_error(response: httpx.Response, status: int, *needles: str, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    for needle in needles:
        assert needle in error["message"], error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def healthy(url: str) -> bool:
    return httpx.get(f"{url}/health").status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "status", "needle", "param"),
    [
        ("/v1/completions", b"{not json", 400, "not valid JSON", None),
        ("/v1/chat/completions", b"", 422, "Field required", None),
        ("/v1/completions", b'["a list"]', 422, "", None),
        ("/v1/completions", b'{"model": "tiny"}', 422, "prompt", "prompt"),
        ("/v1/chat/completions", b'{"model": "tiny"}', 422, "messages: Field required", "messages"),
        ("/v1/chat/completions", b'{"model": "tiny", "messages": []}', 422, "messages", "messages"),
        (
            "/v1/chat/completions",
            b'{"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}',
            422,
            "role",
            None,
        ),
        (
            "/v1/completions",
            b'{"model": "tiny", "prompt": "a", "temperature": -0.5}',
            422,
            "temperature",
            "temperature",
        ),
        ("/v1/completions", b'{"model": "tiny", "prompt": "a", "top_p": 0}', 422, "top_p", "top_p"),
        (
            "/v1/completions",
            b'{"model": "tiny", "prompt": "a", "max_tokens": 0}',
            422,
            "max_tokens",
            "max_tokens",
        ),
        (
            "/v1/completions",
            b'{"model": "tiny", "prompt": "a", "max_tokens": "many"}',
            422,
            "max_tokens",
            "max_tokens",
        ),
        ("/v1/completions", b'{"model": "gpt-4", "prompt": "a"}', 404, "'gpt-4' does not exist", "model"),
        (
            "/v1/completions",
            b'{"model": "tiny", "prompt": "a", "max_tokens": 512}',
            400,
            "at most 511",
            "max_tokens",
        ),
        ("/v1/completions", b'{"model": "tiny", "prompt": ""}', 400, "empty", "prompt"),
        ("/v1/completions", b'{"model": "tiny", "prompt": [1, 2, 3]}', 400, "one text prompt", "prompt"),
        ("/v1/completions", b'{"model": "tiny", "prompt": "a", "n": 2}', 400, "n = 1", "n"),
        ("/v1/completions", b'{"model": "tiny", "prompt": "a", "echo": true}', 400, "echo", None),
        (
            "/v1/chat/completions",
            b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
            400,
            "only text",
            None,
        ),
        ("/v1/nothing", b"{}", 404, "Not Found", None),
    ],
)
def test_bad_request(
    server: ServerProcess, path: str, body: bytes, status: int, needle: str, param: str | None
) -> None:
    headers = {**AUTH, "Content-Type": "application/json"}
    assert_error(
        httpx.post(f"{server.url}{path}", content=body, headers=headers), status, needle, param=param
    )
    assert healthy(server.url)


def test_prompt_beyond_the_context(server: ServerProcess) -> None:
    body = {"model": MODEL, "prompt": "x" * MAX_CONTEXT}
    response = httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH)
    assert assert_error(response, 400, "no room", param="prompt")["code"] == "context_length_exceeded"


def test_openai_client_raises_its_own_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="nope", prompt="a")
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model=MODEL, prompt="a", max_tokens=10_000)
    assert long.value.code == "context_length_exceeded"
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "a"}], temperature=-1
        )


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}])
def test_api_key_is_required_on_v1(server: ServerProcess, headers: dict[str, str]) -> None:
    for method, path in (
        ("GET", "/v1/models"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
    ):
        response = httpx.request(
            method, f"{server.url}{path}", json={"model": MODEL, "prompt": "a"}, headers=headers
        )
        assert assert_error(response, 401, "API key")["code"] == "invalid_api_key"
    assert healthy(server.url)  # /health and /metrics stay open
    assert httpx.get(f"{server.url}/metrics").status_code == 200


def test_openai_client_with_a_wrong_key(server: ServerProcess) -> None:
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


# -- a second server: no chat template, a queue of one, no API key ----------------------------------------
@pytest.fixture(scope="module")
def small_server(plain_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("small-server") / "server.log"
    with ServerProcess(server_args(plain_checkpoint, "--queue-size", "1"), log) as process:
        yield process


def test_chat_without_a_template_is_a_400(small_server: ServerProcess, plain_checkpoint: Path) -> None:
    plain = openai.OpenAI(base_url=f"{small_server.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as error:
        plain.chat.completions.create(
            model=str(plain_checkpoint), messages=[{"role": "user", "content": "hi"}]
        )
    assert "no chat template" in error.value.message
    assert plain.completions.create(model=str(plain_checkpoint), prompt="hi", max_tokens=2).choices[0].text


def metric(url: str, name: str) -> float:
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"{name} not in /metrics")


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_full_queue_is_a_429_and_a_disconnect_stops_generation(
    small_server: ServerProcess, plain_checkpoint: Path
) -> None:
    """A long stream runs; one request waits (the queue holds one); the next is refused with 429. Closing
    the stream stops its generation long before its max_tokens, and the waiting request is answered."""
    url, model = small_server.url, str(plain_checkpoint)
    make = lambda: openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)  # noqa: E731
    tokens_before = metric(url, "offload_completion_tokens_total")
    cancelled_before = metric(url, "offload_requests_cancelled_total")

    long = make().completions.create(model=model, prompt="long", max_tokens=400, stream=True)
    first = next(iter(long))  # generating now
    assert first.choices[0].text
    waiting: dict[str, str] = {}
    thread = threading.Thread(
        target=lambda: waiting.update(
            text=make().completions.create(model=model, prompt="ab", max_tokens=4).choices[0].text
        )
    )
    thread.start()
    wait_for(lambda: httpx.get(f"{url}/health").json()["queue_depth"] == 1)
    with pytest.raises(openai.RateLimitError) as refused:
        make().completions.create(model=model, prompt="c", max_tokens=2)
    assert refused.value.status_code == 429
    assert refused.value.code == "queue_full"
    assert refused.value.response.headers["retry-after"] == "1"

    long.close()  # the client goes away mid-stream
    thread.join(60)
    assert len(waiting["text"]) == 4
    wait_for(lambda: not httpx.get(f"{url}/health").json()["running"])
    assert metric(url, "offload_requests_cancelled_total") == cancelled_before + 1
    generated = metric(url, "offload_completion_tokens_total") - tokens_before
    assert 4 < generated < 4 + 400  # the long request stopped early
    assert healthy(url)


def test_a_client_that_gives_up_on_a_plain_request_stops_it(
    small_server: ServerProcess, plain_checkpoint: Path
) -> None:
    """Not streamed: the handler notices the closed connection while it waits, and cancels the job."""
    url = small_server.url
    tokens_before = metric(url, "offload_completion_tokens_total")
    cancelled_before = metric(url, "offload_requests_cancelled_total")
    body = {"model": str(plain_checkpoint), "prompt": "x", "max_tokens": 300}
    with httpx.Client(timeout=0.5) as hasty, pytest.raises(httpx.ReadTimeout):
        hasty.post(f"{url}/v1/completions", json=body)
    wait_for(lambda: metric(url, "offload_requests_cancelled_total") == cancelled_before + 1)
    assert metric(url, "offload_completion_tokens_total") - tokens_before < 300
    assert healthy(url)
