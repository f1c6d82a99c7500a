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
import threading
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
_registered: set[int] = set()  # addresses this module registered with CUDA: the only ones it unregisters
_registry_lock = threading.Lock()


def host_buffer(nbytes: int, pin: bool) -> tuple[torch.Tensor, bool]:
    """uint8 ``[nbytes]`` of zeroed host memory, and whether it is page-locked (asked for with ``pin``).

    torch's ``pin_memory`` goes through its caching host allocator, which rounds every request up to a
    power of two (a 2.8 GB Mixtral layer would pin 4 GiB). Pinned buffers are therefore anonymous memory
    maps of exactly the size asked (to a page), registered with ``cudaHostRegister`` as torch's own helper
    does; :func:`unpin` releases the registration. If registration fails (a memlock limit, a container, a
    driver cap), the buffer stays pageable and the CUDA error it left behind is consumed, so that torch does
    not report it at its next kernel launch; the caller decides whether to keep asking (the host store stops
    after the first failure, with one warning).
    """
    buffer = mapped_zeros(nbytes) if pin else torch.zeros(nbytes, dtype=torch.uint8)
    if not pin:
        return buffer, False
    error = int(_cudart().cudaHostRegister(buffer.data_ptr(), _pages(nbytes), _CUDA_HOST_REGISTER_PORTABLE))
    if error != 0:
        _consume_cuda_error()
        return buffer, False
    with _registry_lock:
        _registered.add(buffer.data_ptr())
    return buffer, True


def unpin(buffer: torch.Tensor) -> None:
    """Undo :func:`host_buffer`'s registration; a no-op for memory this module did not register."""
    address = buffer.data_ptr()
    with _registry_lock:
        if address not in _registered:
            return
        _registered.discard(address)
    if int(_cudart().cudaHostUnregister(address)) != 0:
        _consume_cuda_error()


def pinning_error() -> str:
    """A line for the warning after a failed registration: the usual causes."""
    return (
        "page-locking host memory failed (cudaHostRegister; a memlock limit, a container or a driver cap): "
        "the rest of the host store stays in pageable memory, where copies to the GPU are slower"
    )


def _cudart() -> Any:
    return torch.cuda.cudart()


def _consume_cuda_error() -> None:
    """A failed runtime call leaves its error as CUDA's "last error", which torch checks after its next kernel
    launch and would report against an unrelated op. Launch a trivial kernel now and swallow what it reports:
    that check is what resets the state (torch binds no cudaGetLastError)."""
    try:
        torch.zeros(1, device="cuda").add_(1)
    except RuntimeError as exc:
        log.debug("consumed a CUDA error left by a failed registration: %s", exc)


def mapped_zeros(nbytes: int) -> torch.Tensor:
    """uint8 ``[nbytes]`` backed by an anonymous, page-aligned memory map (zero pages until written)."""
    region = mmap.mmap(-1, _pages(nbytes), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(region, dtype=torch.uint8)[:nbytes]  # the tensor keeps the map alive


def _pages(nbytes: int) -> int:
    return max(1, -(-nbytes // _PAGE)) * _PAGE
