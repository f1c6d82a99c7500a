"""Where a benchmark's JSON goes: a file (its folder made), or standard output for ``-``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def write_json(payload: dict[str, Any], out: Path | str) -> None:
    text = json.dumps(payload, indent=2) + "\n"
    if str(out) == "-":
        sys.stdout.write(text)
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")
