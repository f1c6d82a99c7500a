"""Finding and validating a checkpoint on disk: safetensors only, no pickle, no remote code."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, PretrainedConfig

from offload.errors import CheckpointError, UnsupportedModelError


@dataclass(frozen=True)
class Checkpoint:
    directory: Path
    files: tuple[Path, ...]  # safetensors shards


def resolve(name_or_path: str | Path) -> Checkpoint:
    """A local directory, or a hub id already in the local Hugging Face cache (nothing is downloaded)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        directory = path
    elif path.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint directory (with config.json) instead")
    else:
        directory = _from_hub_cache(str(name_or_path))
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory} has no config.json: not a Hugging Face checkpoint directory")
    return Checkpoint(directory, _safetensors_files(directory))


def _from_hub_cache(repo_id: str) -> Path:
    looks_like_id = repo_id.count("/") == 1 and not repo_id.startswith((".", "/", "~"))
    if not looks_like_id:
        raise CheckpointError(f"checkpoint {repo_id} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError, OSError):
        raise CheckpointError(
            f"checkpoint {repo_id} is neither a local directory nor in the local Hugging Face cache "
            "(nothing is downloaded: fetch it first, or pass its directory)"
        ) from None


def _safetensors_files(directory: Path) -> tuple[Path, ...]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index ({exc})") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise CheckpointError(
                f"checkpoint {directory} is incomplete: missing shard(s) {', '.join(missing)}"
            )
        files = tuple(directory / n for n in names)
    elif (directory / "model.safetensors").is_file():
        files = (directory / "model.safetensors",)
    else:
        files = tuple(sorted(directory.glob("*.safetensors")))
    if not files:
        pickled = sorted(p.name for p in directory.glob("*.bin")) + sorted(
            p.name for p in directory.glob("*.pt")
        )
        hint = f" (found {', '.join(pickled[:3])}: pickle checkpoints are never loaded)" if pickled else ""
        raise CheckpointError(f"checkpoint {directory} has no .safetensors weights{hint}")
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except SafetensorError as exc:
            raise CheckpointError(
                f"{file.name} is not a valid safetensors file, truncated or corrupt ({exc})"
            ) from None
    return files


def load_config(checkpoint: Checkpoint) -> PretrainedConfig:
    """The checkpoint's transformers config, refusing anything that would need remote code."""
    try:
        raw = json.loads((checkpoint.directory / "config.json").read_text())
    except ValueError as exc:
        raise CheckpointError(f"{checkpoint.directory / 'config.json'} is not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{checkpoint.directory / 'config.json'} is not a JSON object")
    model_type = raw.get("model_type")
    try:
        return AutoConfig.from_pretrained(
            checkpoint.directory, trust_remote_code=False, local_files_only=True
        )
    except ValueError as exc:
        if "auto_map" in raw or "trust_remote_code" in str(exc):
            raise UnsupportedModelError(
                f"model type {model_type!r} needs its own remote code, which moe-offload never runs; "
                "use an architecture built into transformers (offload-run --list-architectures)"
            ) from None
        raise UnsupportedModelError(f"transformers does not know model type {model_type!r} ({exc})") from None


def open_shards(checkpoint: Checkpoint) -> list:
    """Open every shard lazily (memory-mapped); the caller closes them with :func:`close_shards`."""
    return [safe_open(str(f), framework="pt") for f in checkpoint.files]


def close_shards(handles: list) -> None:
    for handle in handles:
        handle.__exit__(None, None, None)
