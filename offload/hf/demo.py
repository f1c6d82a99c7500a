"""The embedded demo: the project's reference model, a small Qwen3-MoE trained here on Python source.

``data/models/reference-moe`` (6 MoE layers x 16 experts, top-4; built by ``tools/train_reference_moe.py``,
its README records how) ships with the source tree, so ``offload-run`` with no ``--model`` runs the real
loading path, cache and copy engine on trained weights and prints text a person recognises as Python.
"""

from __future__ import annotations

import json
from pathlib import Path

from offload.errors import OffloadError

DEMO_DIR = Path(__file__).resolve().parents[2] / "data" / "models" / "reference-moe"
DEMO_CACHE_FRACTION = 0.25  # the demo budget holds about a quarter of the experts
# A prompt should end where a token ends (the model's README explains why): a newline after an import does.
DEMO_PROMPT = "import os\n"
DEMO_NEW_TOKENS = 96
# Greedy decoding of a model this small falls into loops; a repetition penalty of 1.3 breaks most of them
# (transformers' CTRL-style penalty: the logits of tokens already in the text are divided by it).
DEMO_REPETITION_PENALTY = 1.3


def demo_checkpoint(directory: Path = DEMO_DIR) -> Path:
    """The reference model's folder; OffloadError when this install has no copy of it (it lives in the source
    tree, beside the package, not in a wheel)."""
    if not (directory / "config.json").is_file() or not (directory / "model.safetensors").is_file():
        raise OffloadError(
            f"the demo model is not at {directory} (it comes with the source tree); pass --model instead"
        )
    return directory


def demo_max_context(directory: Path = DEMO_DIR) -> int:
    """The longest context the reference model was built for (its ``max_position_embeddings``)."""
    return int(json.loads((directory / "config.json").read_text())["max_position_embeddings"])
