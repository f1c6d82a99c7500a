"""``offload-serve`` in a child process: started on a free loopback port, ready when it answers /health,
and stopped (SIGTERM, then SIGKILL) however the caller ends. For the load test and the server's tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import TracebackType

READY = re.compile(r"offload-serve: serving .* at (http://\S+)/v1")


class ServerProcess:
    def __init__(self, args: list[str], log: Path, timeout: float = 300.0, env: dict[str, str] | None = None):
        """Start ``offload-serve --host 127.0.0.1 --port 0 ARGS`` (later options in ``args`` win), its output
        going to ``log``, and wait until it serves; RuntimeError with the log's tail if it exits first."""
        self.log = log
        command = [sys.executable, "-m", "offload.cli.serve", "--host", "127.0.0.1", "--port", "0", *args]
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
            )
        try:
            self.url = self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        url = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"offload-serve exited with code {self.process.returncode}:\n{self.tail()}"
                )
            if url is None:
                found = READY.search(self.log.read_text(errors="replace"))
                url = found.group(1) if found else None
            if url is not None:
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                        if response.status == 200:
                            return url
                except OSError:
                    pass
            time.sleep(0.1)
        raise RuntimeError(f"offload-serve did not answer within {timeout:.0f} s:\n{self.tail()}")

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (a graceful shutdown that writes --stats-json), SIGKILL after ``timeout``; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
