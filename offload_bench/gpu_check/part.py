"""What a stage has measured so far, written to disk after every update: a stage cut short by its time cap
still hands over every row it finished."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


def clean_json(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    return value


class Part:
    def __init__(self, path: Path, smoke: bool) -> None:
        self.path = path
        self.smoke = smoke
        self.started = time.monotonic()
        self.data: dict[str, Any] = {"targets": []}

    def set(self, **values: Any) -> None:
        self.data.update(values)
        self.flush()

    def add(self, key: str, item: dict[str, Any]) -> None:
        self.data.setdefault(key, []).append(item)
        self.flush()

    def target(self, target: str, value: Any, met: bool | None, **inputs: Any) -> None:
        """One target judged: ``met`` None when it could not be judged here (``inputs`` say why)."""
        status = "N/A" if met is None else "PASS" if met else "FAIL"
        self.add("targets", dict(target=target, value=value, status=status, inputs=inputs))

    def flush(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(clean_json(self.data), indent=1, default=str) + "\n")
        tmp.replace(self.path)

    def elapsed(self) -> float:
        return time.monotonic() - self.started
