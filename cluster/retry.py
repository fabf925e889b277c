"""Retrying calls to a cluster that is still coming up, for a bounded time.

Used by job submission (`cluster/jobs.py`) and by `negatron cluster up` (`cluster/multinode.py`).
"""

from __future__ import annotations

import time

from .errors import NegatronError


class JobsError(NegatronError, RuntimeError):
    """The cluster cannot be reached, refused us, or a job command failed (one-line message)."""


def one_line(e: BaseException) -> str:
    """The first line of an error's message (at most 300 characters), or its type's name."""
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


# Answers a Jobs API gives while a cluster is still coming up (no agent yet, a proxy in front
# restarting, the head still binding): worth retrying, for a bounded time.
TRANSIENT = ("No available agent", "status code 502", "status code 503", "status code 504",
             "Connection refused", "ConnectionRefused", "Connection reset", "Server disconnected")


def is_transient(e: BaseException) -> bool:
    text = f"{type(e).__name__}: {e}"
    return any(t in text for t in TRANSIENT)


def retry_transient(fn, what: str, timeout_s: float = 120.0, first_wait_s: float = 1.0, log=None,
                    sleep=time.sleep, clock=time.monotonic):
    """``fn()``, retried with exponential backoff (1, 2, 4, ... up to 15 s) while it fails with a
    transient answer and ``timeout_s`` has not passed; then JobsError in one line.

    Raises:
        JobsError: a non-transient failure at once, or the last transient one after ``timeout_s``.
    """
    deadline, wait, tries = clock() + timeout_s, first_wait_s, 0
    while True:
        tries += 1
        try:
            return fn()
        except JobsError:
            raise
        except Exception as e:  # noqa: BLE001 - classified below
            if not is_transient(e):
                raise JobsError(f"{what} failed: {one_line(e)}") from None
            if clock() + wait > deadline:
                raise JobsError(f"{what} failed after {tries} tries over {timeout_s:.0f} s: {one_line(e)}") from None
            if log is not None and tries == 1:
                log(f"{what}: the cluster is not ready yet ({one_line(e)}); retrying for up to {timeout_s:.0f} s")
            sleep(wait)
            wait = min(wait * 2, 15.0)
