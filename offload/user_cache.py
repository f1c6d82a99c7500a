"""Where moe-offload keeps what it can rebuild but would rather not: compressed expert stores, machine
probes. ``MOE_OFFLOAD_CACHE`` names the folder; else ``$XDG_CACHE_HOME/moe-offload``; else
``~/.cache/moe-offload``. Everything in it may be deleted at any time."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "MOE_OFFLOAD_CACHE"


def user_cache_dir(*parts: str) -> Path:
    """The cache folder (or a subfolder of it), not created."""
    explicit = os.environ.get(ENV_VAR)
    if explicit:
        root = Path(explicit).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "moe-offload"
    return root.joinpath(*parts)
