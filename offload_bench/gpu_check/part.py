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


def failures_of(record: dict[str, Any]) -> list[str]:
    """What a stage's record says went wrong: the failures it recorded, and every invariant target not met."""
    broken = [
        f"{t['target']}: {t['value']}"
        for t in record.get("targets", [])
        if t.get("invariant") and t["status"] == "FAIL"
    ]
    return [*record.get("failures", []), *broken]


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

    def target(
        self, target: str, value: Any, met: bool | None, invariant: bool = False, **inputs: Any
    ) -> None:
        """One target judged: ``met`` None when it could not be judged here (``inputs`` say why). A target
        judged again (the same name) replaces its earlier verdict. An ``invariant`` (correctness, not speed)
        that is not met fails the stage."""
        status = "N/A" if met is None else "PASS" if met else "FAIL"
        entry = dict(target=target, value=value, status=status, invariant=invariant, inputs=inputs)
        targets = self.data["targets"]
        same = [i for i, t in enumerate(targets) if t["target"] == target]
        if same:
            targets[same[0]] = entry
        else:
            targets.append(entry)
        self.flush()

    def fail(self, reason: str) -> None:
        """The stage found something wrong (as opposed to crashing): recorded, and the stage's status is
        "failed" once it ends."""
        self.data["failures"] = [*self.data.get("failures", []), reason]
        self.flush()

    def flush(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(clean_json(self.data), indent=1, default=str) + "\n")
        tmp.replace(self.path)

    def elapsed(self) -> float:
        return time.monotonic() - self.started
