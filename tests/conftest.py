"""Shared fixtures: tiny MoE checkpoints built in code and saved with save_pretrained (nothing downloaded)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run in Triton's interpreter, which must be switched on before triton
    # is first imported (importing torch does not import it; transformers and offload may).
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ["TRITON_INTERPRET"] == "1":
        from tests.triton_interpreter import speed_up_helper_calls

        speed_up_helper_calls()

import transformers

from tests.tiny_models import TINY_ARCHS, save_tiny

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(scope="session", autouse=True)
def user_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Tests write the user cache (compressed stores, machine probes) to a folder of their own, never the
    user's; subprocesses inherit it."""
    folder = tmp_path_factory.mktemp("user-cache")
    previous = os.environ.get("MOE_OFFLOAD_CACHE")
    os.environ["MOE_OFFLOAD_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("MOE_OFFLOAD_CACHE", None)
    else:
        os.environ["MOE_OFFLOAD_CACHE"] = previous


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-moe")
    return {arch: save_tiny(make(), root / arch) for arch, make in TINY_ARCHS.items()}


@pytest.fixture(scope="session")
def mixtral_checkpoint(tiny_checkpoints: dict[str, Path]) -> Path:
    return tiny_checkpoints["mixtral"]


def reference_model(path: Path, device: str = "cpu") -> transformers.PreTrainedModel:
    """The unmodified transformers model, fp32."""
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
