"""The training driver: validate on the driver, run a Ray Train ``TorchTrainer``, export results.

Outputs in the run folder ``<run.storage_path>/<run.name>/`` (besides Ray's own checkpoints):
``final/`` (the last checkpoint's model, a Hugging Face folder), ``best/`` (the best by dev
MRR@10 when ``data.dev`` is set), ``metrics.json``, ``history.json`` and ``training.png``. The
storage path may be an object-store URI (``negatron.cluster.storage``): every output is written
through that store, and the run needs no filesystem shared between nodes.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from negatron.cluster.config import Config, ConfigError
from negatron.cluster.errors import NegatronError

from .checkpoint import STATE_DIR, read_meta


class TrainingError(NegatronError, RuntimeError):
    """The Ray Train run failed; the message carries the worker's error."""


@dataclass
class TrainResult:
    """Where the outputs are: local folders as ``Path``, folders on an object store as URI strings."""

    run_dir: Path | str
    final_dir: Path | str
    best_dir: Path | str | None
    metrics: dict
    checkpoint_dir: str = ""       # Ray's last checkpoint (model + train_state), a path or URI, for warm starts
    reported: dict | None = None   # the last metrics the workers reported (dev_* keys)


def validate_inputs(cfg: Config, address: str | None = None) -> None:
    """Check data and model on the driver, before any worker starts (raises with a clear message);
    the model kind's task knows what to check. ``trainer.use_gpu`` on the embedded Ray (no
    ``address``: the workers run on this machine) needs a CUDA GPU here."""
    import os

    from .tasks import task_for

    task_for(cfg).validate(cfg)
    from negatron.cluster import storage

    if storage.is_remote(cfg.run.storage_path):
        storage.check_writable(run_folder(cfg))
    from .tracking import require

    require(cfg.run.tracking)
    if not cfg.trainer.use_gpu:
        return
    import ray

    # only a driver about to start the embedded Ray knows its workers will run on this machine
    # (a Tune trial runs in a Ray worker that holds no GPU itself)
    embedded = not (address or os.environ.get("NEGATRON_RAY_ADDRESS") or os.environ.get("RAY_ADDRESS")
                    or ray.is_initialized())
    if embedded:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("trainer.use_gpu is true, but this machine has no CUDA GPU for the embedded Ray "
                              "(torch.cuda.is_available() is False); set trainer.use_gpu=false, or give "
                              "--address of a cluster with GPU nodes")


def absolute_paths(cfg: Config) -> Config:
    """Make local paths absolute so workers (other processes, other cwd) find them; URIs stay."""
    from negatron.cluster.storage import resolve

    upd = {}
    for key in ("train", "dev", "test"):
        v = getattr(cfg.data, key)
        if v:
            upd[f"data.{key}"] = resolve(v)
    if cfg.model.path not in ("default", "cnn"):
        upd["model.path"] = resolve(cfg.model.path)
    if cfg.eval.first_stage != "default":
        upd["eval.first_stage"] = resolve(cfg.eval.first_stage)
    upd["run.storage_path"] = resolve(cfg.run.storage_path)
    return cfg.replace(upd)


def run_folder(cfg: Config) -> Path | str:
    """``<run.storage_path>/<run.name>``: a local ``Path``, or a URI (query kept) on a store."""
    from negatron.cluster import storage

    return storage.folder(storage.join(cfg.run.storage_path, cfg.run.name))


def local_log(run_dir: Path | str) -> Path:
    """``ray.log`` of a run: in the run folder when it is local, else in the local cache."""
    from negatron.cluster import storage

    if not storage.is_remote(run_dir):
        return Path(run_dir) / "ray.log"
    return storage.cache_root().parent / "logs" / storage.name(run_dir) / "ray.log"


def _copy_model(src: Path, dst: Path | str) -> None:
    """Copy a checkpoint's model (not its training state) into ``dst``: locally built beside it and
    swapped in, so a crash or a full disk leaves the previous ``dst``; on an object store put file
    by file (each file atomic)."""
    from negatron.cluster.storage import put_folder

    put_folder(src, dst, ignore=(STATE_DIR,))


def run_training(cfg: Config, address: str | None = None, callbacks: list | None = None,
                 init_checkpoint: str | None = None, stop_at: int | None = None) -> TrainResult:
    """Train ``cfg`` on Ray Train and export final/, best/, metrics.json, training.png.

    Re-running with the same run.name and run.storage_path resumes from the latest checkpoint.
    ``init_checkpoint`` warm-starts a new run from another run's checkpoint (a local path or a URI,
    fetched by each worker; τ and LR from ``cfg``); ``stop_at`` ends the run early at that step (the
    LR schedule spans max_steps).
    Raises:
        ConfigError / SchemaError / ModelLoadError: bad input, before anything starts.
        TrainingError: the run failed (after ``trainer.max_failures`` restarts).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from negatron.cluster import console
    from negatron.cluster.local import ensure_ray

    from .loop import primary_metric, train_loop_per_worker

    validate_inputs(cfg, address)
    cfg = absolute_paths(cfg)
    if init_checkpoint:
        from negatron.cluster import storage

        init_checkpoint = storage.resolve(init_checkpoint)
        read_meta(init_checkpoint)  # a missing or foreign checkpoint, named before Ray starts
    run_dir = run_folder(cfg)
    console.log_to(local_log(run_dir))  # Ray's chatter goes here unless --verbose
    ensure_ray(address)
    t0 = time.perf_counter()
    ckpt_cfg = (CheckpointConfig(num_to_keep=cfg.trainer.keep_checkpoints,
                                 checkpoint_score_attribute=primary_metric(cfg), checkpoint_score_order="max")
                if cfg.data.dev else CheckpointConfig(num_to_keep=cfg.trainer.keep_checkpoints))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "init_checkpoint": init_checkpoint, "stop_at": stop_at},
        torch_config=TorchConfig(timeout_s=cfg.trainer.collective_timeout_s),
        scaling_config=ScalingConfig(
            num_workers=cfg.trainer.num_workers, use_gpu=cfg.trainer.use_gpu,
            resources_per_worker={"CPU": cfg.trainer.cpus_per_worker},
            placement_strategy="SPREAD" if cfg.trainer.placement == "spread" else "PACK"),
        run_config=RunConfig(name=cfg.run.name, storage_path=cfg.run.storage_path,
                             failure_config=FailureConfig(max_failures=cfg.trainer.max_failures),
                             checkpoint_config=ckpt_cfg, callbacks=callbacks),
    )
    try:
        result = _fit_interruptibly(trainer, run_dir)
    except Exception as e:  # Ray wraps worker errors: keep the root cause, drop Ray's frames
        raise TrainingError(f"training failed: {root_cause(e)}") from None
    if getattr(result, "error", None):
        raise TrainingError(f"training failed: {root_cause(result.error)}")
    if result.checkpoint is None:
        raise TrainingError("training finished without a checkpoint")
    from negatron.cluster import storage

    final_dir = storage.sub(run_dir, "final")
    with result.checkpoint.as_directory() as d:
        meta = read_meta(d)
        _copy_model(Path(d), final_dir)
    best_dir, best_metrics = None, None
    if cfg.data.dev:
        best = result.get_best_checkpoint(primary_metric(cfg), "max")
        if best is not None:
            best_dir = storage.sub(run_dir, "best")
            with best.as_directory() as d:
                best_metrics = {k[4:]: v for k, v in read_meta(d).get("metrics", {}).items() if k.startswith("dev_")}
                _copy_model(Path(d), best_dir)
    history = meta.get("history", [])
    train_entries = [h for h in history if "samples_per_s" in h]
    metrics = {k[4:]: v for k, v in meta["metrics"].items() if k.startswith("dev_")}
    metrics.update({
        "steps": meta["step"],
        "samples_per_s": (sum(h["samples_per_s"] for h in train_entries) / len(train_entries)) if train_entries else None,
        "final_loss": meta["metrics"].get("loss"),
        "temperature": meta["metrics"].get("temperature"),
        "wall_s": round(time.perf_counter() - t0, 2),
        "num_workers": cfg.trainer.num_workers,
        "global_batch": cfg.trainer.batch_size * cfg.trainer.num_workers,
        "bank_size": cfg.bank.size,
    })
    storage.write_json(storage.sub(run_dir, "metrics.json"), metrics)
    storage.write_json(storage.sub(run_dir, "history.json"), history, indent=1)
    storage.write_with(storage.sub(run_dir, "training.png"),
                       lambda tmp: plot_history(history, tmp, title=cfg.run.name, metric=primary_metric(cfg)))
    write_cards(cfg, final_dir, best_dir, metrics, best_metrics, meta["step"], history)
    return TrainResult(run_dir, final_dir, best_dir, metrics,
                       checkpoint_dir=storage.uri_on(cfg.run.storage_path, result.checkpoint.path),
                       reported=dict(meta["metrics"]))




def write_cards(cfg: Config, final_dir, best_dir, metrics: dict, best_metrics: dict | None, steps: int,
                history: list[dict], test: dict | None = None, plot: Path | None = None) -> None:
    """The model card (README.md + training.png) in final/ and best/ (trainers/model_card.py);
    ``plot``: the run's training.png when it is already drawn locally, else it is drawn here."""
    import tempfile

    from .loop import primary_metric
    from .model_card import dev_columns, write_model_card

    with tempfile.TemporaryDirectory() as d:
        if plot is None:
            plot = plot_history(history, Path(d) / "training.png", title=cfg.run.name, metric=primary_metric(cfg))
        for folder in (final_dir, best_dir):
            if folder is not None:
                write_model_card(folder, cfg.to_dict(), cfg.run.name, dev_columns(metrics, best_metrics, test),
                                 steps, plot)


def _fit_interruptibly(trainer, run_dir: Path):
    """``trainer.fit()``; on Ctrl-C the driver stops at once and the run stays resumable.

    Ray Train's own SIGINT handler (installed when fit runs on the main thread) aborts the run and
    exits with status 1 and no word of what happened. Fitting on a helper thread keeps Python's
    KeyboardInterrupt on the main thread: the workers end with this process, every checkpoint
    already registered stays, and the same command resumes from the latest one.
    """
    if threading.current_thread() is not threading.main_thread():
        return trainer.fit()
    box: dict = {}

    def fit() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # re-raised on the main thread
            box["error"] = e

    t = threading.Thread(target=fit, name="negatron-fit", daemon=True)
    t.start()
    try:
        while t.is_alive():
            t.join(0.5)
    except KeyboardInterrupt:
        step = latest_registered_step(run_dir)
        print("\nnegatron: training interrupted; " + (f"the latest checkpoint is step {step}" if step is not None
              else "no checkpoint was saved yet"), file=sys.stderr, flush=True)
        raise
    if "error" in box:
        raise box["error"]
    return box["result"]


def registered_steps(run_dir: Path | str) -> list[int]:
    """Steps of the checkpoints Ray Train has registered for the run in ``run_dir`` (its snapshot
    file; a checkpoint folder on disk alone may not be registered yet)."""
    from negatron.cluster import storage

    try:
        snap = storage.read_json(storage.sub(run_dir, "checkpoint_manager_snapshot.json")) or {}
        return [int(c["metrics"]["step"]) for c in snap.get("checkpoint_results", [])]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def latest_registered_step(run_dir: Path) -> int | None:
    """The step of the newest registered checkpoint of the run in ``run_dir``."""
    return max(registered_steps(run_dir), default=None)


def root_cause(e: BaseException) -> str:
    seen = set()
    while True:
        nxt = getattr(e, "cause", None) or e.__cause__
        if nxt is None or id(nxt) in seen:
            break
        seen.add(id(e))
        e = nxt
    text = str(e).strip().splitlines()
    last = text[-1] if text else type(e).__name__
    return f"{type(e).__name__}: {last}" if type(e).__name__ not in last else last


def plot_history(history: list[dict], out: Path, title: str = "", metric: str = "dev_mrr@10",
                 zero_shot: float | None = None) -> Path | None:
    """Loss and the dev metric (MRR@10, or probe accuracy for images) over steps, as a PNG; with
    ``zero_shot`` (the starting model's dev score, when measured) the curve starts at step 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [h for h in history if "loss" in h]
    dev = [h for h in history if metric in h]
    label = "dev " + metric.removeprefix("dev_").replace("mrr@10", "MRR@10")
    if not train and not dev and zero_shot is None:
        return None
    fig, ax1 = plt.subplots(figsize=(7, 4))
    if train:
        ax1.plot([h["step"] for h in train], [h["loss"] for h in train], color="tab:blue", label="train loss")
    ax1.set_xlabel("step")
    ax1.set_ylabel("train loss", color="tab:blue")
    if dev or zero_shot is not None:
        ax2 = ax1.twinx()
        steps, values = [h["step"] for h in dev], [h[metric] for h in dev]
        if zero_shot is not None:
            steps, values = [0, *steps], [zero_shot, *values]
            ax2.annotate("zero-shot", (0, zero_shot), textcoords="offset points", xytext=(6, 4),
                         color="tab:orange", fontsize=8)
        ax2.plot(steps, values, "o-", color="tab:orange", label=label)
        ax2.set_ylabel(label, color="tab:orange")
    ax1.set_title(f"negatron {title}".strip())
    fig.tight_layout()
    fig.savefig(out, dpi=110, format="png")
    plt.close(fig)
    return out
