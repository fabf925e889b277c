"""The per-worker training loop (module-level, takes a plain dict, as Ray Train examples do).

``train_loop_per_worker`` is what ``TorchTrainer`` runs on each worker. The loop itself,
``run_worker``, takes its rank, world size and a ``report`` function as arguments so it also runs
in a single plain process (benchmarks) and in tests.
"""

from __future__ import annotations

import hashlib
import math
import sys
import tempfile
import time
from typing import Callable, Optional

import torch

from negatron.cluster.config import Config
from negatron.cluster.errors import NegatronError

from . import distributed as D
from . import precision
from .checkpoint import load_training_state, optimizer_checksum, save_checkpoint
from .metrics import GEOMETRY
from .step import ContrastiveModel
from .seeds import dropout_seed
from .tasks import task_for
from .tracking import open_tracker

ReportFn = Callable[[dict, Optional[str]], None]


def primary_metric(cfg: Config) -> str:
    """The dev metric that picks the best checkpoint (the task's: MRR@10 for text, k-NN accuracy
    for images)."""
    return task_for(cfg).primary_metric


def build_encoder(cfg: Config, path: str | None = None):
    """The task's encoder, from ``path`` or ``model.path``."""
    return task_for(cfg).build_encoder(cfg, path)


def make_optimizer(model: ContrastiveModel, cfg: Config):
    head_lr = task_for(cfg).head_lr(cfg)
    buckets: dict[tuple[bool, bool], list] = {}
    for name, p in model.encoder.named_parameters():
        no_decay = p.ndim < 2 or "LayerNorm" in name or "bias" in name
        head = bool(head_lr) and _is_scoring_head(name)
        buckets.setdefault((head, no_decay), []).append(p)
    groups = [{"params": ps, "weight_decay": 0.0 if nd else cfg.optim.weight_decay, "head": head,
               "lr": head_lr if head else cfg.optim.lr} for (head, nd), ps in sorted(buckets.items())]
    if isinstance(model.temperature.log_scale, torch.nn.Parameter):
        groups.append({"params": [model.temperature.log_scale], "weight_decay": 0.0, "head": False,
                       "temperature": True, "lr": cfg.optim.temperature_lr or cfg.optim.lr})
    opt = torch.optim.AdamW(groups, lr=cfg.optim.lr)
    warm, total = cfg.optim.warmup_steps, cfg.trainer.max_steps

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if cfg.optim.schedule == "linear":
            return max(0.0, (total - step) / max(1, total - warm))
        return 1.0

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _is_scoring_head(name: str) -> bool:
    """A sequence-classification model's head: the pooler and the classifier (fresh from a bi-encoder)."""
    return any(f".{part}." in f".{name}" for part in ("pooler", "classifier"))


def _group_lr(cfg: Config, group: dict) -> float:
    if group.get("temperature") and cfg.optim.temperature_lr:
        return cfg.optim.temperature_lr
    return cfg.optim.head_lr if group.get("head") and cfg.optim.head_lr else cfg.optim.lr


def _apply_hparams(cfg: Config, model: ContrastiveModel, opt, sched) -> None:
    """Set τ and the base learning rate from ``cfg`` over restored state (PBT exploit)."""
    import math

    with torch.no_grad():
        model.temperature.log_scale.fill_(math.log(1.0 / cfg.loss.temperature))
    sched.base_lrs = [_group_lr(cfg, g) for g in opt.param_groups]
    factor = sched.lr_lambdas[0](sched.last_epoch)
    for group in opt.param_groups:
        group["initial_lr"] = _group_lr(cfg, group)
        group["lr"] = group["initial_lr"] * factor


def _log(line: str) -> None:
    # sys.stdout.write, not print: Ray Train patches print() into its logger too, doubling lines.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class CollectiveTimeout(NegatronError, TimeoutError):
    """A worker waited in a collective longer than ``trainer.collective_timeout_s``."""


def run_worker(cfg: Config, rank: int, world: int, report: ReportFn, **kwargs) -> dict:
    """``train_worker`` with a collective that timed out named in one line (not gloo's or NCCL's
    message from deep inside the process group)."""
    try:
        return train_worker(cfg, rank, world, report, **kwargs)
    except RuntimeError as e:
        if world > 1 and D.is_timeout(e):
            raise CollectiveTimeout(
                f"worker {rank} waited over trainer.collective_timeout_s = {cfg.trainer.collective_timeout_s} s "
                "for the other workers (a gradient all-reduce, a gather or a shared dev check): one is stalled "
                "or much slower. Raise trainer.collective_timeout_s, or lower data.max_dev_docs if the dev "
                f"checks are what takes long ({D.one_line(e)})") from None
        raise


def train_worker(cfg: Config, rank: int, world: int, report: ReportFn, resume_dir: str | None = None,
                 device: torch.device | None = None, log: Callable[[str], None] = _log,
                 warm_start: bool = False, stop_at: int | None = None, node_id: str | None = None) -> dict:
    """Train; call ``report(metrics, checkpoint_dir_or_None)`` at every checkpoint step (all ranks).

    Args:
        resume_dir: a checkpoint to continue from (weights, optimizer, scheduler, bank, τ).
        warm_start: the checkpoint comes from elsewhere (e.g. a PBT donor): restore everything,
            but take τ and the learning rate from ``cfg``, so mutated values survive the restore.
        stop_at: stop (with a checkpoint) at this step; the LR schedule still spans max_steps.
        node_id: this worker's Ray node; all ranks' node ids are reported as ``worker_nodes``.

    Returns the final metrics dict.
    """
    device = device or torch.device("cpu")
    torch.set_num_threads(cfg.trainer.torch_threads)
    worker_nodes = D.all_gather_object(node_id) if node_id else None
    if rank == 0 and worker_nodes:
        log(f"[negatron] {world} worker(s) on {len(set(worker_nodes))} node(s): "
            + ", ".join(f"rank {r} → {n[:8]}" for r, n in enumerate(worker_nodes)))
    task = task_for(cfg)
    stream = task.stream(cfg, rank, world)
    # fresh heads (a reranker's classifier, a projection) must start identical on every worker
    torch.manual_seed(cfg.trainer.seed)
    model = task.build_model(cfg, resume_dir).to(device)
    scaler = precision.setup(model, cfg, device)  # trainer.precision, allow_tf32, model.gradient_checkpointing
    model.train()
    opt, sched = make_optimizer(model, cfg)
    aug = task.augmenter(cfg, model.encoder)
    start, history, last_metrics = 0, [], {}
    if resume_dir:
        meta = load_training_state(resume_dir, model, opt, sched, scaler)
        start, history, last_metrics = meta["step"], meta.get("history", []), meta.get("metrics", {})
        history.append({"resumed_from": start, "bank_checksum": None, **model.queue_checksums(),
                        "optimizer_checksum": optimizer_checksum(opt, sched)})
        if warm_start:
            _apply_hparams(cfg, model, opt, sched)
        if rank == 0:
            bank = f", bank {model.bank.fill()}/{model.bank.size} sum {model.bank.checksum()}" if model.bank else ""
            log(f"[negatron] resumed from step {start}{bank}")
    end = min(cfg.trainer.max_steps, stop_at or cfg.trainer.max_steps)
    if resume_dir and start >= end:
        # resumed at or past its last step (a run, or a Tune trial, restarted after it finished):
        # report the final result again, so whoever waits for it (Tune) gets it
        scalars = {k: v for k, v in last_metrics.items() if not isinstance(v, list)}
        report(scalars, resume_dir if rank == 0 else None)
        return last_metrics
    if model.bank is not None and cfg.bank.prefill and not resume_dir:
        t_fill = time.perf_counter()
        texts, ids = stream.prefill(cfg.bank.size)
        fill = model.prefill_bank(texts, ids, batch_size=cfg.eval.batch_size)
        if rank == 0:
            log(f"[negatron] bank prefilled: {fill}/{model.bank.size} keys in {time.perf_counter() - t_fill:.1f} s")
    dev = task.dev_evaluator(cfg) if rank == 0 or task.shared_dev else None
    if rank == 0 and dev is not None and task.shared_dev and start < end:
        log(f"[negatron] dev checks: {len(dev.docs)} docs and {len(dev.qids)} queries, "
            f"embedded by all {world} worker(s) (about {-(-len(dev.docs) // world)} docs each)")

    params = model.trainable_parameters()
    reducer = D.GradReducer(params)
    t_log, t0, n_since, loss_sum, loss_n = time.perf_counter(), time.perf_counter(), 0, 0.0, 0
    masked_sum = 0.0  # the bank's false-negative share, summed on the device between log lines
    guide_sum = 0.0  # the guide's (GISTEmbed) masked share of in-batch negatives, likewise
    tracker = open_tracker(cfg, rank)  # run.tracking: TensorBoard / MLflow on rank 0
    key = primary_metric(cfg)
    best = max((h[key] for h in history if key in h), default=-1.0)
    # a running digest of every global batch's rows since step 0: a resumed run that continues at
    # the saved data position ends with the same digest as an uninterrupted one
    data_digest = last_metrics.get("data_digest", "")
    # the next batch is read and augmented in a background thread while this one trains; each
    # batch is a function of (seed, step, rank) alone, so the run is the same as without it
    prefetch = Prefetcher(lambda s: task.views(stream.batch(s), aug, cfg, s, rank), start, end)
    try:
        for step in range(start, end):
            torch.manual_seed(dropout_seed(cfg.trainer.seed, step, rank))  # dropout: a function of (seed, step, rank)
            data_digest = rows_digest(data_digest, stream.global_rows(step))
            batch = prefetch.get(step)
            opt.zero_grad(set_to_none=True)
            # one pass or the cached step; the gradient all-reduce overlaps the (last) backward pass
            loss, state = model.forward_backward(batch, step, scaler, before_last_backward=reducer.arm)
            reducer.finish()  # identical gradients on every rank, so every fp16 scaler skips alike
            if scaler is not None:
                scaler.unscale_(opt)
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            if scaler is not None:
                scaler.step(opt)  # skipped when a gradient overflowed; the scale then shrinks
                scaler.update()
            else:
                opt.step()
            model.temperature.clamp_()  # the stored τ, after the step (its gradient never vanishes at a bound)
            sched.step()
            model.after_step(state, step)
            loss_sum = loss_sum + loss  # on the device: read back only when logging (no sync per step)
            if "bank_masked" in state:
                masked_sum = masked_sum + state["bank_masked"]
            if "guide_masked" in state:
                guide_sum = guide_sum + state["guide_masked"]
            loss_n += 1
            n_since += stream.global_batch
            done = step + 1
            now = time.perf_counter()
            is_checkpoint = done % cfg.trainer.checkpoint_every == 0 or done == end
            log_now = rank == 0 and (now - t_log >= cfg.trainer.log_every_s or done == end)
            if log_now or is_checkpoint:
                mean_loss = float(loss_sum) / loss_n
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(f"loss is {mean_loss} in the steps up to {done}; lower optim.lr or raise "
                                             "loss.temperature")
            if log_now:
                entry = {"step": done, "epoch": round(stream.epoch_of(done), 3), "loss": mean_loss,
                         "temperature": model.temperature.value(), "samples_per_s": n_since / (now - t_log),
                         "lr": sched.get_last_lr()[0],
                         "bank_fill": model.bank.fill() if model.bank is not None else 0}
                if model.bank is not None:  # bank health
                    entry["bank_mean_age"] = model.bank.mean_age(done)
                    entry["bank_masked_share"] = float(masked_sum) / loss_n
                if getattr(model, "guide", None) is not None:  # GISTEmbed: in-batch negatives the guide masked
                    entry["guide_masked_share"] = float(guide_sum) / loss_n
                history.append(entry)
                if tracker is not None:
                    tracker.log(entry, done)
                log(f"[negatron] step {done}/{cfg.trainer.max_steps} epoch {entry['epoch']:.2f} "
                    f"loss {entry['loss']:.4f} tau {entry['temperature']:.4f} "
                    f"{entry['samples_per_s']:.1f} samples/s bank {entry['bank_fill']}")
                t_log, n_since, loss_sum, loss_n, masked_sum, guide_sum = now, 0, 0.0, 0, 0.0, 0.0
            if is_checkpoint:
                metrics = {"step": done, "epoch": stream.epoch_of(done), "loss": float(loss),
                           "temperature": model.temperature.value(), "wall_s": time.perf_counter() - t0,
                           "optimizer_checksum": optimizer_checksum(opt, sched), "data_digest": data_digest}
                metrics.update(model.queue_checksums())  # the bank's and a GISTEmbed guide's queue
                if model.bank is not None:
                    # every rank's checksum: the bank must be identical everywhere (reported by rank 0)
                    metrics["bank_checksums"] = D.all_gather_object(metrics["bank_checksum"])
                if worker_nodes:
                    metrics["worker_nodes"] = worker_nodes
                m = task.evaluate(dev, model.encoder, cfg) if dev is not None else None
                if m:  # rank 0 (the others take part in a shared check and get None)
                    metrics.update({f"dev_{k}": v for k, v in m.items()})
                    shown = tuple(k for k in task.shown_metrics if k in m)
                    history.append({"step": done, **{f"dev_{k}": m[k] for k in shown},
                                    **{f"dev_{k}": round(m[k], 4) for k in GEOMETRY if k in m},
                                    **({"dev_check_s": m["check_s"]} if "check_s" in m else {})})
                    best = max(best, metrics[key])
                    took = f" in {m['check_s']:.1f} s" if "check_s" in m else ""
                    if tracker is not None:
                        tracker.log({f"dev_{k}": v for k, v in m.items()}, done)
                        tracker.flush()
                    log(f"[negatron] step {done} dev " + " ".join(f"{k} {m[k]:.4f}" for k in shown[:2])
                        + f" (best {key[4:]} {best:.4f}){took}")
                if dev is not None:
                    model.encoder.train()
                last_metrics = metrics
                # lists (worker_nodes, bank_checksums) stay in the checkpoint's negatron.json: Ray's
                # loggers want scalars
                scalars = {k: v for k, v in metrics.items() if not isinstance(v, list)}
                if rank == 0:
                    with tempfile.TemporaryDirectory(prefix="negatron-ckpt-") as tmp:
                        save_checkpoint(tmp, model, opt, sched, done, cfg.to_dict(), metrics, history, scaler)
                        report(scalars, tmp)
                else:
                    report(scalars, None)
    finally:
        if tracker is not None:
            tracker.close()
    return last_metrics


class Prefetcher:
    """``make(step)`` for steps ``start`` .. ``end`` - 1, one step ahead, in one background thread
    (in step order, so a stream that reads ahead sees the order it would see inline)."""

    def __init__(self, make: Callable[[int], dict], start: int, end: int):
        from concurrent.futures import ThreadPoolExecutor

        self.make, self.end = make, end
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="negatron-prefetch")
        self.next = (start, self.pool.submit(make, start)) if start < end else None

    def get(self, step: int) -> dict:
        if self.next is None or self.next[0] != step:  # only ever asked in order; else inline
            return self.make(step)
        batch = self.next[1].result()  # re-raises the reader's error (a bad block) here
        self.next = (step + 1, self.pool.submit(self.make, step + 1)) if step + 1 < self.end else None
        if self.next is None:
            self.pool.shutdown(wait=False)
        return batch


def rows_digest(previous: str, rows) -> str:
    """Fold one global batch's row indices into the running data digest."""
    return hashlib.sha256(previous.encode() + rows.astype("int64").tobytes()).hexdigest()[:16]


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: ``config = {"config": Config.to_dict()}``."""
    import ray.train
    from ray.train import Checkpoint

    cfg = Config.from_dict(config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device("cpu")
    if cfg.trainer.use_gpu:  # never a silent CPU run when a GPU was asked for
        import ray.train.torch as rt

        device = rt.get_device()
        if device.type != "cuda":
            raise RuntimeError(f"trainer.use_gpu is true, but worker {rank} sees no CUDA device "
                               f"(torch.cuda.is_available() = {torch.cuda.is_available()})")

    def report(metrics: dict, ckpt_dir: str | None) -> None:
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None)

    stop_at = config.get("stop_at")
    node = ray.get_runtime_context().get_node_id()
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:  # a restart of this run: its own latest checkpoint
        with ckpt.as_directory() as d:
            run_worker(cfg, rank, world, report, resume_dir=d, device=device, stop_at=stop_at, node_id=node)
    elif config.get("init_checkpoint"):  # a warm start from another run's checkpoint
        from negatron.cluster import storage

        # a URI is fetched once per node into a temporary folder, removed when the last worker is done
        fs, inner = storage.filesystem(config["init_checkpoint"])
        with Checkpoint(inner, filesystem=fs).as_directory() as d:
            run_worker(cfg, rank, world, report, resume_dir=d, device=device,
                       warm_start=True, stop_at=stop_at, node_id=node)
    else:
        run_worker(cfg, rank, world, report, device=device, stop_at=stop_at, node_id=node)

