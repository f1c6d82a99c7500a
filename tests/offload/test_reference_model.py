"""The committed reference model (data/models/reference-moe): it loads, offloading leaves its outputs as they
are, it is still a trained model, and the pre-attention predictor guesses its routing well.

Thresholds, measured on the committed checkpoint (docs/prediction.md, bench/results/): held-out bits per byte
of the four windows scored here BPB_WINDOWS_MEASURED, against 3.51 for the untrained model and 3.45 for a
uniform guess; pre-attention recall over one decoded window RECALL_MEASURED.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import offload
from offload.hf.install import runtime_of
from offload_bench.prediction import decode_teacher_forced
from offload_bench.reference_text import REFERENCE_DIR, HeldOut, bits_per_byte, held_out
from tests.helpers import ATOL, RTOL

SEQ = 256  # the model's max_position_embeddings
QUARTER = 24  # of its 96 experts
BPB_WINDOWS_MEASURED = 1.705  # fp32 compute over the 4 windows below
BPB_LIMIT = 2.3  # far under an untrained model's 3.5: the file cannot silently become noise
RECALL_MEASURED = 0.78  # layer 0: 0.41 (its input is the bare embedding), layers 1-5: 0.75-0.9
RECALL_LIMIT = 0.65


@pytest.fixture(scope="module")
def text() -> HeldOut:
    return held_out(AutoTokenizer.from_pretrained(REFERENCE_DIR))


@pytest.fixture(scope="module")
def hf_model() -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(REFERENCE_DIR, dtype=torch.float32).eval()


def offloaded(slots: int, **options) -> torch.nn.Module:
    """The reference model offloaded at ``slots`` slots of fp32 experts (a budget that leaves that many)."""
    from offload.config import OffloadConfig
    from offload.hf.skeleton import survey_checkpoint
    from offload.runtime.budget import budget_for_slots

    config = OffloadConfig.create(1, device="cpu", dtype="fp32", max_context=SEQ, **options)
    budget = budget_for_slots(survey_checkpoint(str(REFERENCE_DIR), torch.float32), config, slots)
    return offload.from_pretrained(
        REFERENCE_DIR,
        vram_budget=budget,
        device="cpu",
        dtype="fp32",
        max_context=SEQ,
        progress=False,
        **options,
    )


def spread(text: HeldOut, count: int) -> list[torch.Tensor]:
    windows = text.windows(SEQ)
    return windows[:: len(windows) // count][:count]


def test_offloaded_equals_transformers(text: HeldOut, hf_model: torch.nn.Module) -> None:
    """Logits of a held-out window and greedy generation, at a quarter of the experts with pre-attention
    prefetch, against the unmodified model (same tolerance as the tiny-model equivalence tests)."""
    ids = spread(text, 1)[0][None, :64]
    model = offloaded(QUARTER, prefetch="pre-attention", copy_engine="threaded")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf_model(ids).logits, atol=ATOL, rtol=RTOL)
    settings = dict(max_new_tokens=24, do_sample=False, repetition_penalty=1.3)
    assert torch.equal(model.generate(ids, **settings), hf_model.generate(ids, **settings))
    stats = offload.stats(model)
    assert stats.slots == QUARTER and stats.expert_misses > 0 and stats.prefetch_issued > 0


def test_held_out_loss_is_a_trained_models(text: HeldOut) -> None:
    model = offloaded(96)
    score = bits_per_byte(model, spread(text, 4), text.nbytes)
    assert score["bits_per_byte"] < BPB_LIMIT, score
    assert score["bits_per_byte"] == pytest.approx(BPB_WINDOWS_MEASURED, abs=0.01), score


def test_pre_attention_recall_on_the_trained_model(text: HeldOut) -> None:
    """Every layer is guessed before it runs, and most of the experts it then uses were guessed (least in
    layer 0, whose input, the token's embedding, its attention changes most)."""
    model = offloaded(QUARTER, prefetch="pre-attention")
    decode_teacher_forced(model, [spread(text, 1)[0][:128]])
    score = runtime_of(model).step.prefetcher.score
    assert score.coverage() == 1.0
    assert score.recall() > RECALL_LIMIT, score.as_dict()
    assert all(score.recall(layer) > 0.6 for layer in range(1, 6)), score.as_dict()
    stats = offload.stats(model)
    assert stats.prefetch_recall == score.recall() and stats.prefetch_used > 0
