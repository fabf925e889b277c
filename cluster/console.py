"""What a run prints: Negatron's own progress lines, warnings and errors on the terminal; Ray's
chatter (per-report INFO lines, actor constructor warnings, library banners) in a log file.

By default (quiet) the lines Ray forwards from its workers are filtered: lines that Negatron's
code printed (``[negatron] ...``) and Python tracebacks and warnings reach the terminal, and every
line, kept or not, is appended to the current log file (``ray.log`` in the run or experiment
folder, set with ``log_to``). The driver's own Ray logger keeps its errors on the terminal and
writes the rest to the same file. ``negatron --verbose`` (or ``NEGATRON_VERBOSE=1``) shows
everything as Ray prints it. Nothing is lost either way: Ray also keeps every worker's output in
its session folder (``/tmp/ray/session_latest/logs``).

Ray 2.60 has no public hook for filtering forwarded worker output; this replaces the driver's
``ray_print_logs`` handler on Ray's stdout/stderr dispatcher and falls back to Ray's own printing
if that private interface changes.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from pathlib import Path

# forwarded worker lines that belong on the terminal
KEEP = re.compile(r"\[negatron\]|Traceback \(most recent call last\)|^\s*\w+(Error|Exception|Warning): ")

_lock = threading.Lock()
_log_file = None  # the open log file, or None


def verbose() -> bool:
    return os.environ.get("NEGATRON_VERBOSE", "") not in ("", "0")


def set_verbose(on: bool) -> None:
    if on:
        os.environ["NEGATRON_VERBOSE"] = "1"


def quiet_libraries() -> None:
    """Hide library progress bars and banners on the driver (transformers' weight-loading bars)."""
    if verbose():
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def log_to(path: Path | str | None) -> Path | None:
    """Append Ray's filtered-out lines to ``path`` from now on (None: only Ray's session logs)."""
    global _log_file
    with _lock:
        if _log_file is not None:
            _log_file.close()
            _log_file = None
        if path is not None:
            p = Path(path)
            p.parent.mkdir(parents=True, exist_ok=True)
            _log_file = open(p, "a", encoding="utf-8", errors="replace", buffering=1)  # noqa: SIM115 - kept open
            return p
    return None


def _write(text: str) -> None:
    with _lock:
        if _log_file is not None:
            _log_file.write(text if text.endswith("\n") else text + "\n")


def _who(data: dict) -> str:
    name = data.get("actor_name") or data.get("task_name") or "worker"
    return f"({name} pid={data.get('pid')}, ip={data.get('ip')})"


def _forward(data: dict) -> None:
    """Ray's stdout/stderr dispatcher handler: everything to the log file, the kept lines on the
    terminal without Ray's prefix."""
    lines = data.get("lines") or []
    who = _who(data)
    for line in lines:
        _write(f"{who} {line}")
    kept = [line for line in lines if KEEP.search(line)]
    if kept:
        sink = sys.stderr if data.get("is_err") else sys.stdout
        print("\n".join(kept), file=sink, flush=True)


class _ToLogFile(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            _write(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never raise
            pass


def before_ray_init() -> None:
    """Before ``ray.init``: the driver's Ray logger keeps errors on the terminal and sends the rest
    (the token-auth notice, start-up INFO) to the log file. Idempotent."""
    quiet_logger("ray")


def quiet_logger(name: str) -> None:
    """Logger ``name`` (``ray``, or ``ray.data``, which Ray Data configures with its own handlers
    when imported) keeps errors on the terminal and sends the rest to the log file, unless verbose."""
    if verbose():
        return
    ray_logger = logging.getLogger(name)
    for h in ray_logger.handlers:
        if not isinstance(h, (_ToLogFile, logging.FileHandler)):
            h.setLevel(logging.ERROR)
    if not any(isinstance(h, _ToLogFile) for h in ray_logger.handlers):
        to_file = _ToLogFile(logging.INFO)
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        ray_logger.addHandler(to_file)


def after_ray_init() -> bool:
    """After ``ray.init``: filter the output Ray forwards from its workers unless verbose.
    Returns whether the filter is in place."""
    if verbose():
        return False
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # a Ray without this private interface: leave Ray's printing alone
        return False
    handlers = dict(dispatcher.handlers)
    if handlers.get("ray_print_logs") is _forward:
        return True
    if "ray_print_logs" not in handlers:
        return False  # log_to_driver is off: nothing is forwarded
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", _forward)
    return True
