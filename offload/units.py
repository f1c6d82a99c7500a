"""Byte sizes as people write them: ``12GB``, ``12GiB``, ``800MB``, ``1.5G``."""

from __future__ import annotations

import re

# Decimal SI units for kB/MB/GB/TB (as drive and card vendors print them), binary for KiB/MiB/GiB/TiB and
# for the bare letters K/M/G/T (as `free -g`, docker and llama.cpp read them).
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
    "K": 2**10,
    "M": 2**20,
    "G": 2**30,
    "T": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([A-Za-z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Bytes in ``text``; an int is taken as bytes. Raises ValueError naming the accepted forms."""
    if isinstance(text, bool):
        raise ValueError(f"not a size: {text!r}")
    if isinstance(text, int):
        if text <= 0:
            raise ValueError(f"a size must be positive, got {text}")
        return text
    match = _SIZE.match(str(text))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"cannot read size {text!r}: use a number with a unit, like 12GB, 12GiB, 800MB or 1.5G"
        )
    value = float(match.group(1)) * _UNITS[unit]
    if value < 1:
        raise ValueError(f"a size must be positive, got {text!r}")
    return int(value)


def format_size(nbytes: float) -> str:
    """Human-readable, binary units: ``11.2 GiB``."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{int(nbytes)} B"
