"""Stopping a child process and everything it started: a stage at its cap, or the pytest run inside the
``tests`` stage, may have started processes of their own (in other process groups too), which must not stay
behind holding the GPU."""

from __future__ import annotations

import contextlib
import os
import signal


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid``, its process group and every descendant; quiet about any that are already gone."""
    import psutil

    try:
        descendants = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    for proc in descendants:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)  # started with start_new_session: its pid is its group's
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)
