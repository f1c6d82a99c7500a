"""offload-serve with no --model serves the demo's reference model: greedy completions are offload-run's demo
text (the demo's repetition penalty included), and chat renders as a Python file of comments."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from offload.cli.run import main as offload_run
from offload.cli.serve import DEMO_NAME
from offload.hf.demo import DEMO_PROMPT
from offload_bench.serve_process import ServerProcess

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def demo_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    log = tmp_path_factory.mktemp("demo") / "server.log"
    args = ["--device", "cpu", "--max-new-tokens", str(NEW_TOKENS), "--log-level", "warning"]
    with ServerProcess(args, log) as process:
        assert "Demo: " in log.read_text() and "repetition penalty of 1.3" in log.read_text()
        yield openai.OpenAI(base_url=f"{process.url}/v1", api_key="none", max_retries=0, timeout=120)


def test_demo_completion_equals_offload_run(
    demo_client: openai.OpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    assert [m.id for m in demo_client.models.list().data] == [DEMO_NAME]
    capsys.readouterr()
    assert offload_run(["--device", "cpu", "--max-new-tokens", str(NEW_TOKENS)]) == 0
    out = capsys.readouterr().out  # the demo prints its prompt, then the continuation
    served = demo_client.completions.create(model=DEMO_NAME, prompt=DEMO_PROMPT).choices[0].text
    assert out == DEMO_PROMPT + served + "\n"
    penalty_off = demo_client.completions.create(
        model=DEMO_NAME, prompt=DEMO_PROMPT, extra_body={"repetition_penalty": 1.0}
    )
    assert penalty_off.choices[0].text != served  # the request's penalty replaces the server's 1.3


def test_demo_chat(demo_client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Read a config file\nand return a dict."}]
    reply = demo_client.chat.completions.create(model=DEMO_NAME, messages=messages)
    assert reply.usage is not None and reply.usage.prompt_tokens > 10  # the comment lines
    assert reply.choices[0].message.content and reply.choices[0].message.content.isascii()


def test_reference_chat_template() -> None:
    from offload.hf.demo import demo_checkpoint
    from offload.hf.generation import encode_chat, load_tokenizer

    tokenizer = load_tokenizer(str(demo_checkpoint()))
    messages = [
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": "Read a config\n\nfile."},
        {"role": "assistant", "content": "import json"},
        {"role": "user", "content": "Now YAML."},
    ]
    ids = encode_chat(tokenizer, messages)["input_ids"][0]
    expected = "<|endoftext|># You write Python.\n# Read a config\n#\n# file.\nimport json\n# Now YAML.\n"
    assert tokenizer.decode(ids) == expected
