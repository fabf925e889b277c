"""Getting a Ray to run on: the embedded local default, or an existing cluster by address."""

from __future__ import annotations

import os


def ensure_ray(address: str | None = None, num_cpus: float | None = None) -> None:
    """Start (or attach to) Ray once per process, with the console filter of ``console`` (Ray's
    chatter to the log file set by ``console.log_to``; ``NEGATRON_VERBOSE=1`` shows it all).

    With no address, an embedded local Ray is started in-process (``address="local"``), so a
    cluster someone else runs on this machine is never joined by accident. ``address`` (or
    RAY_ADDRESS set by ``ray job submit``) attaches to an existing cluster.
    """
    import ray

    from . import console

    if ray.is_initialized():
        return
    console.before_ray_init()
    address = address or os.environ.get("NEGATRON_RAY_ADDRESS")
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                           "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    elif os.environ.get("RAY_ADDRESS"):  # inside a Ray job: the job's cluster and runtime env
        ray.init(log_to_driver=True)
    else:
        # Ray CPUs are logical: twice the cores (at least 4) lets trial drivers, fractional workers
        # and Ray Data share a small machine without starving each other.
        cpus = num_cpus if num_cpus is not None else max(4, 2 * (os.cpu_count() or 2))
        # The dashboard serves the state API that Ray Train's placement-group cleaner polls: without
        # it, a trial stopped by ASHA leaks its workers' placement group until the driver exits.
        init_local(num_cpus=cpus, include_dashboard=True, runtime_env=env, log_to_driver=True,
                   logging_level="INFO")  # the terminal shows errors only unless verbose (console.before_ray_init)
    console.after_ray_init()
    stop_on_sigterm()


def stop_on_sigterm() -> None:
    """SIGTERM (``kill``, a batch scheduler's stop, ``negatron jobs stop``) ends this driver the way
    Ctrl-C does: ``KeyboardInterrupt`` on the main thread, so the command says in one line that it
    was interrupted and whether the same command resumes, and the embedded Ray is shut down on
    the way out. ``ray.init`` installs its own handler, under which the process printed a native
    "*** SIGTERM received ... PC: @ 0x7f…" dump and nothing of Negatron's. Call after ``ray.init``;
    a no-op off the main thread (``negatron serve`` installs its own stop handler on top)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def free_port(lo: int = 20000, hi: int = 30000) -> int:
    """A free TCP port in [lo, hi), by default outside Ray's worker-port range 10002–19999."""
    import secrets
    import socket

    from .errors import NegatronError

    for _ in range(200):
        port = secrets.randbelow(hi - lo) + lo
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise NegatronError(f"no free port found between {lo} and {hi}")


def start_failure(err: Exception, temp_dir: str | None = None) -> Exception:
    """Ray's "The current node timed out during startup" names no cause; its raylet's log does. On a
    machine loaded by other work the raylet aborts when its dashboard agent has not written its
    port file within 15 s (``Timed out waiting for file .../metrics_agent_port_…``, not configurable
    in Ray 2.60). Returns a NegatronError with that line and the log's path."""
    import tempfile
    from pathlib import Path

    from .errors import NegatronError

    root = Path(temp_dir or tempfile.gettempdir(), "ray")
    sessions = sorted(root.glob(f"session_*_{os.getpid()}"), key=lambda p: p.stat().st_mtime)
    cause, where = "", ""
    if sessions:
        log = sessions[-1] / "logs" / "raylet.out"
        try:
            lines = log.read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        fatal = [ln for ln in lines if "Check failed" in ln or " C " in ln[:40]]
        if fatal:
            cause = fatal[0].split("Check failed:", 1)[-1].strip()
            cause = cause.split(")", 1)[-1].strip() if cause.startswith("status") else cause
        where = f" (its log: {log})"
    hint = ("the machine may be too busy for Ray to start its processes in time; run it again, or "
            "when less else is running")
    return NegatronError(f"the embedded Ray did not start: {cause or str(err).strip()}{where}; {hint}")


def init_local(runtime_env: dict | None = None, **kwargs) -> str:
    """``ray.init(address="local", ...)`` whose workers know their own cluster's address.

    Ray's state API, which Ray Train's placement-group cleaner calls from inside the cluster, finds
    "the" cluster by RAY_ADDRESS or, without it, by looking for running GCS processes, and fails
    with "Found multiple active Ray instances" when two embedded Rays run on one machine (a
    ``negatron serve`` beside a ``negatron train``): the cleaner's thread dies and a stopped
    trial's placement group is never freed, so later trials wait for CPUs forever. So the GCS port
    is chosen here and every worker gets RAY_ADDRESS pointing at it. Returns that address.

    SIGTERM then ends the caller like Ctrl-C (``stop_on_sigterm``): a ``KeyboardInterrupt`` that runs
    its ``finally`` blocks (``ray.shutdown``), where Ray's own handler printed a native stack dump
    and exited 1.
    """
    import ray

    port = free_port()
    address = f"{ray.util.get_node_ip_address()}:{port}"  # the IP the head node will bind its GCS to
    env = dict(runtime_env or {})
    env["env_vars"] = {**env.get("env_vars", {}), "RAY_ADDRESS": address}
    before = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)  # read by the head node when it picks its GCS port
    try:
        ray.init(address="local", runtime_env=env, **kwargs)
    except Exception as e:  # noqa: BLE001 - only Ray's start-up timeout is translated
        if "timed out during startup" not in str(e):
            raise
        raise start_failure(e, kwargs.get("_temp_dir")) from None
    finally:
        if before is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = before
    stop_on_sigterm()  # a bench or notebook that starts Ray here also shuts it down on `kill`
    return address
