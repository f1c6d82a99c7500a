"""Host RAM is planned before a checkpoint is read: the store, one layer in flight and (on a CPU device) the
device's plan, against what is available and the user's limit, with the format that would fit."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

import offload
from offload.config import OffloadConfig
from offload.errors import HostMemoryError
from offload.hf.skeleton import survey_checkpoint
from offload.runtime.host_plan import check_host_memory, plan_host


def _survey(path: Path, fmt: str = "float", group: int = 0):
    survey = survey_checkpoint(str(path))
    return replace(survey, layout=replace(survey.layout, format=fmt, group_size=group))


def test_terms_of_the_plan(mixtral_checkpoint: Path) -> None:
    survey = _survey(mixtral_checkpoint)
    plan = plan_host(survey, device_bytes=1000)
    layer = survey.num_experts * survey.layout.nbytes
    assert plan.store_bytes == survey.num_layers * layer
    assert plan.loading_bytes == layer
    assert plan.total_bytes == plan.store_bytes + layer + 1000
    int4 = plan_host(_survey(mixtral_checkpoint, "int4", 64), device_bytes=0)
    assert int4.store_bytes < plan.store_bytes / 2
    # Quantizing holds the full-precision layer and its packed copy at once.
    assert (
        int4.loading_bytes
        == layer + survey.num_experts * _survey(mixtral_checkpoint, "int4", 64).layout.nbytes
    )


def test_too_little_ram_names_what_is_needed_and_the_format_that_fits(mixtral_checkpoint: Path) -> None:
    survey = _survey(mixtral_checkpoint)
    config = OffloadConfig.create("1GB", device="cpu")
    full = plan_host(survey, 0).total_bytes
    int4 = plan_host(_survey(mixtral_checkpoint, "int4", 64), 0).total_bytes
    with pytest.raises(HostMemoryError) as caught:
        check_host_memory(survey, config, device_bytes=0, available=(full + int4) // 2)
    message = str(caught.value)
    assert "\n" not in message and "host RAM: the model needs" in message and "available" in message
    assert "--quantize" in message and "it needs" in message
    assert check_host_memory(survey, config, 0, available=full).total_bytes == full


def test_host_memory_limit_is_a_ceiling_below_what_is_available(mixtral_checkpoint: Path) -> None:
    survey = _survey(mixtral_checkpoint)
    config = OffloadConfig.create("1GB", device="cpu", host_memory_limit=1000)
    with pytest.raises(HostMemoryError, match="host_memory_limit is"):
        check_host_memory(survey, config, device_bytes=0, available=10**12)


def test_nothing_smaller_than_int4(mixtral_checkpoint: Path) -> None:
    survey = _survey(mixtral_checkpoint, "int4", 64)
    config = OffloadConfig.create("1GB", device="cpu", quantize="int4")
    with pytest.raises(HostMemoryError, match="no smaller expert format"):
        check_host_memory(survey, config, device_bytes=0, available=10)


def test_a_load_too_big_for_the_limit_fails_before_reading(mixtral_checkpoint: Path) -> None:
    with pytest.raises(HostMemoryError, match="host RAM"):
        offload.from_pretrained(
            mixtral_checkpoint, vram_budget="1GB", device="cpu", host_memory_limit="10KB", progress=False
        )
