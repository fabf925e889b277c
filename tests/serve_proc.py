"""Run `negatron serve` as a child process and follow its output without ever blocking the test."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`python -m negatron.cluster.cli serve ARGS` with a reader thread collecting its lines."""

    def __init__(self, args: list[str], cwd, env: dict | None = None):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "negatron.cluster.cli", "serve", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     cwd=cwd, start_new_session=True)
        self.lines: list[str] = []
        self.url: str | None = None
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("negatron serve: ready at"):
                self.url = line.split("ready at", 1)[1].split()[0]
                self._ready.set()
        self._ready.set()  # EOF: the process ended

    def tail(self, n: int = 40) -> str:
        return "".join(self.lines[-n:])

    def wait_ready(self, timeout: float = 300) -> str:
        self._ready.wait(timeout)
        assert self.url, f"`negatron serve` not ready after {timeout:.0f} s; its output:\n{self.tail()}"
        return self.url

    def stop(self, sig=signal.SIGTERM, timeout: float = 120) -> int:
        """Send `sig` and wait for the exit code (killing the process group if it hangs)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"`negatron serve` did not exit {timeout:.0f} s after {sig!r}:\n{self.tail()}")
        self._reader.join(10)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(30)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self) -> "ServeProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()
