"""Training metrics where people look: TensorBoard event files or an MLflow run (``run.tracking``).

Rank 0 logs every progress line's numbers (loss, τ, samples/s, learning rate, bank fill, the bank
entries' mean age, the share of bank entries masked as likely false negatives) and every dev
check's metrics, at their step. Files go to the run folder: ``<run>/tensorboard/`` (event files
``tensorboard --logdir`` reads) or ``<run>/mlruns/`` (an MLflow file store; ``run.tracking_uri``
names an MLflow server instead). When the run folder is on an object store the files are written
locally and uploaded at every checkpoint and at the end.

Extras: ``pip install 'negatron[tracking]'`` (tensorboard, mlflow-skinny).
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

from negatron.cluster import storage
from negatron.cluster.config import ConfigError

FOLDERS = {"tensorboard": "tensorboard", "mlflow": "mlruns"}
EXPERIMENT = "negatron"


def require(kind: str) -> None:
    """A clear error, on the driver before anything starts, when the tracker's package is missing."""
    mod = {"tensorboard": "tensorboard", "mlflow": "mlflow"}.get(kind)
    if mod is None:
        return
    try:
        __import__(mod)
    except ImportError:
        raise ConfigError(f"run.tracking: {kind} needs the {mod} package; install it with "
                          "pip install 'negatron[tracking]' (or set run.tracking: none)") from None


def _scalars(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


class Tracker:
    """One run's tracker on rank 0. ``log(values, step)``; ``flush()`` at checkpoints; ``close()``."""

    def __init__(self, kind: str, run_dir: str, run_name: str, params: dict[str, Any], tracking_uri: str = ""):
        self.kind, self.dest = kind, storage.join(run_dir, FOLDERS[kind])
        self.remote = storage.is_remote(run_dir)
        self._tmp = tempfile.mkdtemp(prefix="negatron-tracking-") if self.remote else None
        self.local = Path(self._tmp) if self.remote else Path(self.dest)
        self.local.mkdir(parents=True, exist_ok=True)
        if self.remote and storage.is_dir(self.dest):  # a restarted run continues its files
            storage.get_folder(self.dest, self.local)
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.local))
        else:
            self._open_mlflow(run_name, params, tracking_uri)

    def _open_mlflow(self, run_name: str, params: dict[str, Any], tracking_uri: str) -> None:
        # a local file store in the run folder (maintenance mode in MLflow 3, still read by its UI
        # and client); a server when run.tracking_uri is given
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri or self.local.resolve().as_uri())
        exp = self.client.get_experiment_by_name(EXPERIMENT)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(EXPERIMENT)
        found = self.client.search_runs([exp_id], f"tags.negatron_run = '{run_name}'", max_results=1)
        if found:  # a restart after a failure: the same MLflow run
            self.run_id = found[0].info.run_id
        else:
            run = self.client.create_run(exp_id, run_name=run_name, tags={"negatron_run": run_name})
            self.run_id = run.info.run_id
            flat = [Param(k, str(v)[:500]) for k, v in params.items()]
            for i in range(0, len(flat), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=flat[i:i + 100])

    def log(self, values: dict[str, Any], step: int) -> None:
        scalars = _scalars({k: v for k, v in values.items() if k != "step"})
        if not scalars:
            return
        if self.kind == "tensorboard":
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
        else:
            import time

            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(_mlflow_key(k), v, now, step)
                                                        for k, v in scalars.items()])

    def flush(self) -> None:
        if self.kind == "tensorboard":
            self.writer.flush()
        if self.remote:
            storage.put_folder(self.local, self.dest)

    def close(self) -> None:
        if self.kind == "tensorboard":
            self.writer.close()
        else:
            self.client.set_terminated(self.run_id)
        if self.remote:
            storage.put_folder(self.local, self.dest)
            import shutil

            shutil.rmtree(self._tmp, ignore_errors=True)


def _mlflow_key(k: str) -> str:
    """MLflow keys allow letters, digits, _ - . / and spaces: 'dev_mrr@10' -> 'dev_mrr_at_10'."""
    return k.replace("@", "_at_")


def flat_params(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The nested config as dotted keys (MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def open_tracker(cfg, rank: int) -> Tracker | None:
    """The run's tracker on rank 0 (None elsewhere, or with ``run.tracking: none``)."""
    if rank != 0 or cfg.run.tracking == "none":
        return None
    run_dir = storage.join(cfg.run.storage_path, cfg.run.name)  # train.run_folder's rule; loop imports this module
    return Tracker(cfg.run.tracking, run_dir, cfg.run.name, flat_params(cfg.to_dict()), cfg.run.tracking_uri)
