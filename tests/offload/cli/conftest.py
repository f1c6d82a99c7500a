"""A tiny checkpoint the command-line tests run."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.byte_tokenizer import byte_tokenizer
from tests.conftest import TINY_ARCHS, save_tiny


@pytest.fixture(scope="session")
def cli_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Mixtral with the demo's byte tokenizer, so the CLI can encode a prompt and stream text."""
    directory = tmp_path_factory.mktemp("cli") / "mixtral"
    config = TINY_ARCHS["mixtral"]()
    tokenizer = byte_tokenizer()
    config.vocab_size = len(tokenizer)
    save_tiny(config, directory)
    tokenizer.save_pretrained(directory)
    return directory
