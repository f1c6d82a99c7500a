"""Errors a user can cause and fix. Each message is one line that says what to do."""

from __future__ import annotations


class OffloadError(ValueError):
    """Base class: bad input to the runtime (the CLI turns these into exit code 2)."""


class BudgetError(OffloadError):
    """The VRAM budget cannot hold the fixed part plus one layer's top-k experts."""

    def __init__(self, message: str, minimum_bytes: int) -> None:
        super().__init__(message)
        self.minimum_bytes = minimum_bytes


class HostMemoryError(OffloadError):
    """The host store and the load's peak do not fit in the host RAM available (or allowed)."""

    def __init__(self, message: str, needed_bytes: int) -> None:
        super().__init__(message)
        self.needed_bytes = needed_bytes


class CheckpointError(OffloadError):
    """The checkpoint is missing, truncated, corrupt, or not in safetensors format."""


class UnsupportedModelError(OffloadError):
    """The model is dense, or its architecture has no experts module the runtime can take over."""
