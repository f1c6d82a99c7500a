"""The reference model's held-out text, as ``tools/train_reference_moe.py`` held it out and scored it.

The held-out files are named in the model's ``training.json`` and read from this machine's Python standard
library (every machine has it); their contents hash is checked against the one recorded at training time, so
a different Python version is caught rather than silently scored. Tokenized as in training (each file
preceded by the ``<|endoftext|>`` separator) and cut into the same windows: ``seq + 1`` tokens overlapping by
one, so every token after the first is a target once. Bits per byte = nats over the scored targets / ln 2 /
the UTF-8 bytes they stand for; separator targets stand for no byte and are not scored.
"""

from __future__ import annotations

import hashlib
import json
import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from offload.hf.demo import DEMO_DIR

REFERENCE_DIR = DEMO_DIR  # data/models/reference-moe


@dataclass(frozen=True)
class HeldOut:
    stream: torch.Tensor  # [N] int64: <|endoftext|> file <|endoftext|> file ...
    nbytes: torch.Tensor  # [vocab] int64: UTF-8 bytes each token stands for (0 for the separator)
    files: tuple[str, ...]
    sha256: str  # of the held-out contents: path, NUL, bytes, per file in order

    def windows(self, seq: int) -> list[torch.Tensor]:
        """Consecutive windows of ``seq + 1`` tokens overlapping by one (the last may be shorter)."""
        return [self.stream[i : i + seq + 1] for i in range(0, len(self.stream) - 1, seq)]


def training_record(directory: Path = REFERENCE_DIR) -> dict[str, Any]:
    return json.loads((directory / "training.json").read_text())


def held_out(tokenizer: Any, directory: Path = REFERENCE_DIR) -> HeldOut:
    """The held-out files of the model in ``directory``, tokenized with ``tokenizer`` (its own)."""
    record = training_record(directory)["corpus"]
    names = record["held_out"]["names"]
    root = Path(sysconfig.get_paths()["stdlib"])
    raw = []
    for name in names:
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(
                f"held-out file {name} is not in this Python's standard library ({root}); the model was "
                f"trained on Python {record['python']}'s"
            )
        raw.append(path.read_bytes())
    digest = hashlib.sha256()
    for name, data in zip(names, raw, strict=True):
        digest.update(name.encode() + b"\0" + data)
    if sum(map(len, raw)) != record["held_out"]["bytes"]:
        raise ValueError(
            f"the held-out files in {root} have {sum(map(len, raw))} bytes, not the {record['held_out']['bytes']} "
            f"they had in training (Python {record['python']}): another Python's standard library"
        )
    texts = [data.decode() for data in raw]
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        ids += [eos, *enc.ids]
    lengths = torch.tensor([len(tokenizer.convert_ids_to_tokens(i)) for i in range(len(tokenizer))])
    lengths[eos] = 0  # byte-level BPE: one character per byte; the separator stands for none
    return HeldOut(torch.tensor(ids, dtype=torch.long), lengths, tuple(names), digest.hexdigest())


@torch.no_grad()
def bits_per_byte(model: Any, windows: list[torch.Tensor], nbytes: torch.Tensor) -> dict[str, float | int]:
    """Bits per byte of ``model`` over ``windows`` (each scored from a fresh context), one window a call."""
    nats, total_bytes, targets = 0.0, 0, 0
    for window in windows:
        x = window.to(model.device)[None]
        logits = model(input_ids=x[:, :-1]).logits[0].float()  # [T, vocab]
        target = x[0, 1:]
        ce = F.cross_entropy(logits, target, reduction="none")
        keep = nbytes.to(target.device)[target] > 0
        nats += ce[keep].double().sum().item()
        total_bytes += int(nbytes.to(target.device)[target].sum())
        targets += int(target.numel())
    return {"bits_per_byte": nats / math.log(2) / total_bytes, "bytes": total_bytes, "targets": targets}
