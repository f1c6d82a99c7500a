"""Give freed host memory back to the OS while loading.

Converting one layer allocates and frees its HF tensors; glibc keeps such freed chunks in its arenas, so
without a trim the process would hold several layers' worth of dead memory on top of the host store.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from typing import Any


@functools.cache
def _malloc_trim() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


def release_freed_host_memory() -> None:
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
