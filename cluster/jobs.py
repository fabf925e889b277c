"""`negatron submit` and `negatron jobs`: work on a Ray cluster through the Jobs API.

``submit`` validates the config here, builds the Negatron wheel and ships its package with the
config in the job's runtime_env (``py_modules`` + ``working_dir``), so nodes need no checkout. Token auth
(Ray 2.60) comes from RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH, or from the record of a cluster that
`negatron cluster up` started at the same address; the token itself is never printed.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from .config import ConfigError, dump_yaml, load_config
from .retry import JobsError, retry_transient  # noqa: F401 - JobsError is re-exported
from .retry import one_line as _one_line


def auth_env_for(address: str) -> None:
    """Use the token of a cluster we started at this address when none is configured.

    Must run before ``ray`` is imported: Ray reads RAY_AUTH_MODE once per process.
    """
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        return
    from .multinode import read_state, token_env

    try:
        state = read_state()
    except ConfigError:
        return
    if state and address.rstrip("/") == state["dashboard"].rstrip("/"):
        os.environ.update(token_env(state["token_path"]))


def client(address: str):
    """A JobSubmissionClient, or JobsError naming the address and the reason."""
    if not address.startswith(("http://", "https://")):
        raise JobsError(f"--address {address!r}: give the dashboard URL, e.g. http://127.0.0.1:8265")
    auth_env_for(address)
    from ray.job_submission import JobSubmissionClient

    try:
        c = JobSubmissionClient(address)
        c.list_jobs()  # fails fast on a refused token
        return c
    except Exception as e:  # ConnectionError, HTTP 401/403 as RuntimeError, ...
        msg = _one_line(e)
        if "401" in msg or "403" in msg or "nauthor" in msg or "token" in msg.lower():
            raise JobsError(f"the Ray cluster at {address} refused the request: authentication failed "
                            "(set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the cluster's token)") from None
        raise JobsError(f"cannot reach the Ray Jobs API at {address}: {msg}") from None


def project_root() -> Path:
    here = Path(__file__).resolve().parent.parent
    if (here / "pyproject.toml").is_file():
        return here
    raise JobsError("negatron submit builds the wheel from a source checkout, but this install has none; "
                    "run it from a clone (pip install -e .)")


def unpack_wheel(wheel: Path, out_dir: Path) -> Path:
    """The wheel's ``negatron`` package as a folder, for ``py_modules``: a ``.whl`` there is
    pip-installed with all its dependencies (ray, torch, ...) on every node; the folder is just
    put on the path, next to what the cluster already has installed."""
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        z.extractall(out_dir)
    pkg = out_dir / "negatron"
    if not (pkg / "cluster" / "cli.py").is_file():
        raise JobsError(f"{wheel.name}: the wheel holds no negatron package")
    return pkg


def build_wheel(out_dir: Path) -> Path:
    root = project_root()
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(out_dir), str(root)], capture_output=True, text=True, timeout=600)
    wheels = sorted(out_dir.glob("negatron-*.whl"))
    if r.returncode != 0 or not wheels:
        raise JobsError("building the negatron wheel failed: " + _one_line(Exception(r.stderr or r.stdout)))
    return wheels[-1]


def _absolute_local_paths(cfg):
    """Relative paths that exist here become absolute (right for a cluster on this machine or
    with shared storage); anything else is left for the cluster to resolve."""
    upd = {}
    for key in ("data.train", "data.dev", "data.test", "model.path", "run.storage_path", "eval.first_stage",
                "serve.encoder.path", "serve.reranker.path", "serve.retriever.corpus"):
        section, name = key.split(".", 1)
        obj = getattr(cfg, section)
        for part in name.split("."):
            obj = getattr(obj, part)
        v = obj
        if v and v != "default" and "://" not in v and not Path(v).is_absolute() and (
                Path(v).exists() or key == "run.storage_path"):
            upd[key] = str(Path(v).resolve())
    return cfg.replace(upd) if upd else cfg


def job_env() -> dict[str, str]:
    """The environment a job's ``runtime_env`` carries: fixed settings only. Credentials (object
    store keys, tokens) are never shipped: each node reads its own from its environment, its
    instance role or its provider's credential files."""
    return {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1"}


def submit(kind: str, address: str, config: str | None, overrides: list[str], wait: bool = True,
           log=print) -> int:
    """Submit `negatron <kind>` as a Ray job; follow its logs unless ``wait`` is False.

    Returns 0 when the job succeeded (or was submitted, without waiting), 1 otherwise.
    """
    if kind not in ("train", "tune", "serve", "quickstart"):
        raise JobsError(f"cannot submit {kind!r}: choose train, tune, serve or quickstart")
    cfg = _absolute_local_paths(load_config(config, overrides))  # config errors stay local
    c = client(address)
    with tempfile.TemporaryDirectory(prefix="negatron-job-") as d:
        d = Path(d)
        job_dir = d / "job"
        job_dir.mkdir()
        (job_dir / "negatron.yaml").write_text(dump_yaml(cfg))
        log("building the negatron wheel ...")
        wheel = build_wheel(d / "dist")
        module = unpack_wheel(wheel, d / "module")
        job_id = f"negatron-{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        entry = f"python -m negatron.cluster.cli {kind} --config negatron.yaml"
        env = job_env()
        # a freshly started cluster answers 500 "No available agent" for a few seconds
        job_id = retry_transient(lambda: c.submit_job(entrypoint=entry, submission_id=job_id, runtime_env={
            "working_dir": str(job_dir), "py_modules": [str(module)], "env_vars": env}),
            f"submitting to {address}", log=log)
    log(f"submitted job {job_id}: {entry}")
    log(f"  follow: negatron jobs logs {job_id} --address {address}   stop: negatron jobs stop {job_id} --address {address}")
    if not wait:
        return 0
    return follow(c, job_id, log)


def follow(c, job_id: str, log=print) -> int:
    """Stream a job's logs until it ends; 0 if it SUCCEEDED."""
    async def tail():
        async for chunk in c.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        log(f"\nstopped following; the job keeps running (negatron jobs stop {job_id})")
        return 130
    except Exception as e:  # the log stream broke: fall back to polling
        log(f"(log stream ended: {_one_line(e)})")
    status = c.get_job_status(job_id)
    while not status.is_terminal():
        time.sleep(2)
        status = c.get_job_status(job_id)
    info = c.get_job_info(job_id)
    log(f"job {job_id}: {status.value}" + (f" ({info.message})" if info.message and status.value != "SUCCEEDED" else ""))
    return 0 if status.value == "SUCCEEDED" else 1


def jobs(action: str, address: str, job_id: str | None = None, log=print) -> int:
    c = client(address)
    try:
        if action == "list":
            for j in sorted(c.list_jobs(), key=lambda j: j.start_time or 0):
                log(f"{j.submission_id or j.job_id}  {j.status.value:<10}  {j.entrypoint}")
            return 0
        if not job_id:
            raise JobsError(f"negatron jobs {action} needs a job id (see negatron jobs list)")
        if action == "status":
            info = c.get_job_info(job_id)
            log(f"{job_id}: {info.status.value}" + (f" — {info.message}" if info.message else ""))
            return 0
        if action == "logs":
            sys.stdout.write(c.get_job_logs(job_id))
            return 0
        if action == "stop":
            log(f"{job_id}: stop requested" if c.stop_job(job_id) else f"{job_id}: already finished")
            return 0
    except JobsError:
        raise
    except Exception as e:
        raise JobsError(f"negatron jobs {action} {job_id or ''}: {_one_line(e)}") from None
    raise JobsError(f"unknown jobs action {action!r}")
