"""`negatron cluster up|down|status`: a local multi-node Ray cluster on 127.0.0.1.

``up`` starts a head and N worker nodes with ``ray start`` (each its own raylet, resources and
temp dir, all under one fresh root folder), with token authentication on (a token file of its
own), and records what it started in ``<state dir>/cluster.json``. ``down`` stops exactly the
processes whose command line names that root folder — never other Ray clusters on the machine
(``ray stop`` would kill them all).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .config import ConfigError
from .errors import NegatronError
from .local import free_port


class ClusterError(NegatronError, RuntimeError):
    """Starting or stopping the local cluster failed (one-line message)."""


def state_dir() -> Path:
    return Path(os.environ.get("NEGATRON_CLUSTER_DIR", "~/.negatron/cluster")).expanduser()


def _ray_bin() -> str:
    ray = Path(sys.executable).with_name("ray")
    return str(ray) if ray.is_file() else (shutil.which("ray") or "ray")


def _agent_ports() -> list[str]:
    """Free ports for a node's agents. Ray's defaults (dashboard agent HTTP 52365, metrics 8080)
    are fixed: a second node on this machine, or any other Ray running here, would collide, and a
    head whose job agent cannot start answers every job submission "No available agent"."""
    return [f"--dashboard-agent-listen-port={free_port(32001, 33000)}",
            f"--metrics-export-port={free_port(33001, 34000)}"]


def token_env(token_path: str | Path) -> dict[str, str]:
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}


def _env(token_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(token_env(token_path))
    # jobs' `python` is whatever the raylet has on PATH: put this interpreter's folder first
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def _node_env(env: dict, node_dir: Path) -> dict:
    """Each node keeps its own cache of models fetched from object storage (as separate machines
    would): nothing one node fetched is visible to another."""
    return {**env, "NEGATRON_CACHE": str(node_dir / "negatron-cache")}


def _run(cmd: list[str], env: dict, timeout: float) -> None:
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ClusterError(f"`{' '.join(cmd[:3])} ...` did not finish in {timeout:.0f}s") from None
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-5:]
        raise ClusterError(f"`{' '.join(cmd[:3])} ...` failed: " + " | ".join(tail))


def our_processes(root: str) -> list:
    """Live processes whose command line names ``root`` (only what this cluster started)."""
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(root in part for part in (p.info["cmdline"] or [])):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def read_state() -> dict | None:
    f = state_dir() / "cluster.json"
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError:
        raise ConfigError(f"{f}: corrupt cluster state file; remove it after checking no cluster runs") from None


def up(workers: int = 1, cpus_per_node: float = 2, log=print) -> dict:
    """Start head + ``workers`` nodes; returns the recorded state (addresses, root, token path)."""
    if workers < 0 or cpus_per_node <= 0:
        raise ConfigError(f"need --workers >= 0 and --cpus-per-node > 0 (got {workers}, {cpus_per_node})")
    old = read_state()
    if old and our_processes(old["root"]):
        raise ConfigError(f"a cluster started by negatron is already running ({old['address']}); "
                          "run `negatron cluster down` first")
    sd = state_dir()
    sd.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="negatron-cluster-"))
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = _env(token)
    port, dash = free_port(), free_port(30001, 32000)
    state = {"root": str(root), "address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}",
             "token_path": str(token), "workers": workers, "cpus_per_node": cpus_per_node, "started": time.time()}
    (sd / "cluster.json").write_text(json.dumps(state, indent=2))  # before starting: `down` can always clean up
    ray = _ray_bin()
    try:
        log(f"starting the head on {state['address']} (dashboard {state['dashboard']})")
        _run([ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", f"--dashboard-port={dash}",
              "--dashboard-host=127.0.0.1", f"--num-cpus={cpus_per_node:g}", f"--temp-dir={root / 'head'}",
              "--disable-usage-stats", *_agent_ports()], _node_env(env, root / "head"), timeout=180)
        for i in range(workers):
            log(f"starting worker node {i + 1}/{workers}")
            _run([ray, "start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1",
                  f"--num-cpus={cpus_per_node:g}", f"--temp-dir={root / f'node{i + 1}'}", "--disable-usage-stats",
                  *_agent_ports()], _node_env(env, root / f"node{i + 1}"), timeout=180)
    except Exception:
        down(log=lambda *_: None)
        raise
    state["pids"] = [p.pid for p in our_processes(str(root))]
    (sd / "cluster.json").write_text(json.dumps(state, indent=2))
    try:
        wait_jobs_ready(state, log=log)
    except Exception:
        down(log=lambda *_: None)
        raise
    return state


def wait_jobs_ready(state: dict, timeout_s: float = 180.0, log=print) -> None:
    """Return once the cluster's Jobs API runs a job: a trivial one is submitted (retried while the
    head answers "No available agent" or similar) and waited for, then deleted.

    Raises:
        ClusterError: the Jobs API did not run it within ``timeout_s``.
    """
    from .retry import JobsError, retry_transient

    env = token_env(state["token_path"])
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        from ray.job_submission import JobSubmissionClient

        log("waiting for the Jobs API to accept a job ...")
        deadline = time.monotonic() + timeout_s
        try:
            c = retry_transient(lambda: JobSubmissionClient(state["dashboard"]), "connecting to the Jobs API",
                                timeout_s=timeout_s)
            sid = f"negatron-ready-{secrets.token_hex(4)}"
            retry_transient(lambda: c.submit_job(entrypoint="python -c pass", submission_id=sid),
                            "a readiness job", timeout_s=max(1.0, deadline - time.monotonic()))
            while not c.get_job_status(sid).is_terminal():
                if time.monotonic() > deadline:
                    raise ClusterError(f"the Jobs API at {state['dashboard']} accepted a job but did not run it "
                                       f"within {timeout_s:.0f} s")
                time.sleep(0.5)
            status = c.get_job_status(sid).value
            c.delete_job(sid)
        except JobsError as e:
            raise ClusterError(f"the cluster started but its Jobs API is not usable: {e}") from None
        if status != "SUCCEEDED":
            raise ClusterError(f"a trivial readiness job ended {status} on {state['dashboard']}; see `ray status`")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def down(log=print, grace_s: float = 15.0) -> int:
    """Stop the processes of the recorded cluster (SIGTERM, then SIGKILL after ``grace_s``)."""
    import psutil

    state = read_state()
    if state is None:
        log("no cluster recorded (nothing to stop)")
        return 0
    procs = our_processes(state["root"])
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    shutil.rmtree(state["root"], ignore_errors=True)
    (state_dir() / "cluster.json").unlink(missing_ok=True)
    log(f"stopped {len(procs)} processes of the cluster at {state['address']}")
    return len(procs)


def status() -> str:
    """`ray status` of the recorded cluster (nodes and resources)."""
    state = read_state()
    if state is None:
        raise ConfigError("no cluster recorded: start one with `negatron cluster up`")
    if not our_processes(state["root"]):
        raise ConfigError(f"the recorded cluster at {state['address']} is not running (`negatron cluster down` "
                          "clears the record)")
    r = subprocess.run([_ray_bin(), "status", f"--address={state['address']}"], env=_env(Path(state["token_path"])),
                       capture_output=True, text=True, timeout=60)
    head = (f"cluster at {state['address']}, dashboard/jobs {state['dashboard']}, "
            f"{1 + state['workers']} nodes × {state['cpus_per_node']:g} CPUs\n"
            f"token: export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={state['token_path']}\n")
    return head + (r.stdout or r.stderr)
