"""Host memory: exact-size pinned buffers for the store, and giving freed memory back while loading.

Converting one layer allocates and frees its HF tensors; glibc keeps such freed chunks in its arenas, so
without a trim the process would hold several layers' worth of dead memory on top of the host store.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import mmap
import sys
from typing import Any

import torch

log = logging.getLogger(__name__)


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


_PAGE = mmap.PAGESIZE
_CUDA_HOST_REGISTER_PORTABLE = 1


def host_buffer(nbytes: int, pin: bool) -> torch.Tensor:
    """uint8 ``[nbytes]`` of zeroed host memory; page-locked for asynchronous copies when ``pin``.

    torch's ``pin_memory`` goes through its caching host allocator, which rounds every request up to a
    power of two (a 2.8 GB Mixtral layer would pin 4 GiB). Pinned buffers are therefore anonymous memory
    maps of exactly the size asked (to a page), registered with ``cudaHostRegister`` as torch's own helper
    does; :func:`unpin` releases the registration. If registration fails, torch's allocator is used.
    """
    if not pin:
        return torch.zeros(nbytes, dtype=torch.uint8)
    buffer = mapped_zeros(nbytes)
    error = int(
        torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), _pages(nbytes), _CUDA_HOST_REGISTER_PORTABLE)
    )
    if error != 0:
        log.warning("cudaHostRegister failed (error %d); pinning with torch's allocator, rounded up", error)
        return torch.zeros(nbytes, dtype=torch.uint8, pin_memory=True)
    return buffer


def unpin(buffer: torch.Tensor) -> None:
    """Undo :func:`host_buffer`'s registration (a no-op for memory torch pinned or did not pin)."""
    if buffer.is_pinned() and buffer.data_ptr() % _PAGE == 0 and torch.cuda.is_available():
        torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())


def mapped_zeros(nbytes: int) -> torch.Tensor:
    """uint8 ``[nbytes]`` backed by an anonymous, page-aligned memory map (zero pages until written)."""
    region = mmap.mmap(-1, _pages(nbytes), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(region, dtype=torch.uint8)[:nbytes]  # the tensor keeps the map alive


def _pages(nbytes: int) -> int:
    return max(1, -(-nbytes // _PAGE)) * _PAGE
