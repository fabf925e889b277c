"""A closed-loop HTTP load generator that records every request's outcome, and a `negatron serve`
child process to point it at.

Test and benchmark tooling, not installed with the package. The fault tests and
``bench/faults.py`` use it to drive ``/v1/embeddings`` while something breaks, and to say
afterwards what clients saw: successes, clean JSON errors, transport errors, hangs, and how long
the service took to recover.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import httpx


@dataclass
class Outcome:
    start: float
    end: float
    status: Optional[int]  # None: no HTTP response (connection refused/reset, timeout)
    error: str = ""  # the transport error's name, or the JSON error's message
    json_error: bool = False  # a 4xx/5xx whose body is {"error": {...}}


@dataclass
class Load:
    """``threads`` clients POST ``body`` to ``url`` back to back until ``stop()``."""

    url: str
    body: dict
    threads: int = 4
    timeout_s: float = 30.0
    headers: dict = field(default_factory=dict)
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers = [threading.Thread(target=self._client, daemon=True) for _ in range(self.threads)]

    def start(self) -> "Load":
        for w in self._workers:
            w.start()
        return self

    def stop(self, join_s: float = 60.0) -> bool:
        """Stop the clients; False if one is still stuck in a request after ``join_s``."""
        self._stop.set()
        deadline = time.monotonic() + join_s
        for w in self._workers:
            w.join(max(0.0, deadline - time.monotonic()))
        return not any(w.is_alive() for w in self._workers)

    def _client(self) -> None:
        with httpx.Client(timeout=self.timeout_s, headers=self.headers) as c:
            while not self._stop.is_set():
                t0 = time.time()
                try:
                    r = c.post(self.url, json=self.body)
                    o = Outcome(t0, time.time(), r.status_code)
                    if r.status_code >= 400:
                        try:
                            o.error = r.json()["error"]["message"]
                            o.json_error = True
                        except (ValueError, KeyError, TypeError):
                            o.error = r.text[:200]
                except httpx.TransportError as e:
                    o = Outcome(t0, time.time(), None, type(e).__name__)
                    time.sleep(0.05)  # a refused connection returns at once: don't spin
                with self._lock:
                    self.outcomes.append(o)


def summarize(outcomes: list[Outcome], t_event: float) -> dict:
    """What clients saw around an event at ``t_event`` (time.time()).

    recovery_s: from the event until the first request sent after it succeeded (requests may
    queue for a replacement replica rather than fail); last_error_s: until the last failure ended.
    """
    after = [o for o in outcomes if o.end >= t_event]
    failed = [o for o in after if o.status != 200]
    first_ok = min((o.end for o in outcomes if o.start >= t_event and o.status == 200), default=None)
    lat = sorted(o.end - o.start for o in outcomes if o.status == 200)
    return {
        "requests": len(outcomes),
        "ok": sum(o.status == 200 for o in outcomes),
        "errors": len(failed),
        "errors_5xx_json": sum(o.status is not None and o.status >= 500 and o.json_error for o in failed),
        "errors_5xx_other": sum(o.status is not None and o.status >= 500 and not o.json_error for o in failed),
        "errors_4xx": sum(o.status is not None and 400 <= o.status < 500 for o in failed),
        "errors_transport": sum(o.status is None for o in failed),
        "recovery_s": round(first_ok - t_event, 3) if first_ok is not None else None,
        "last_error_s": round(max((o.end for o in failed), default=t_event) - t_event, 3),
        "max_latency_s": round(max((o.end - o.start for o in outcomes), default=0.0), 3),
        "p50_ok_latency_s": round(lat[len(lat) // 2], 4) if lat else None,
        "error_messages": sorted({o.error for o in failed})[:5],
    }


def tagged_pids(tag: str, children_of: int | None = None) -> list[int]:
    """PIDs of processes whose command line contains ``tag`` (Ray sets process titles such as
    ``ray::RayTrainWorker`` or ``ServeReplica:app:Deployment``); only descendants of
    ``children_of`` when given."""
    import psutil

    procs = psutil.Process(children_of).children(recursive=True) if children_of else psutil.process_iter()
    out = []
    for p in procs:
        try:
            if any(tag in part for part in p.cmdline()):
                out.append(p.pid)
        except psutil.Error:
            continue
    return out


def replica_pids(app: str, deployment: str) -> list[int]:
    """PIDs of this machine's Serve replica processes of ``app``/``deployment``."""
    return tagged_pids(f"ServeReplica:{app}:{deployment}")


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
