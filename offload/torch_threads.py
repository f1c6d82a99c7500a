"""Threads that run torch on a set number of intra-op threads: host workers, the probes, and the int4pack
copy's conversion (experts side by side on one intra-op thread each)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch


def use_torch_threads(count: int) -> None:
    """Run this thread's torch ops on ``count`` intra-op threads. ``torch.set_num_threads`` also sets the count
    that threads started later begin with; a short-lived thread sets that back, leaving others as they were."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    if before != count:
        restore = threading.Thread(target=torch.set_num_threads, args=(before,))
        restore.start()
        restore.join()


def torch_thread_pool(workers: int, torch_threads: int, name: str = "") -> ThreadPoolExecutor:
    """``workers`` threads, each running torch ops on ``torch_threads`` intra-op threads."""
    return ThreadPoolExecutor(workers, name, use_torch_threads, (torch_threads,))
