"""Hyperparameter search with Ray Tune: each trial is a whole Ray Train run.

The config's ``tune:`` section holds the search space as dotted config keys (the same keys as
``a.b=value`` overrides). Every sampled value is validated against the config schema before any
trial starts. Trials launch a ``TorchTrainer`` from a Tune function trainable, as Ray 2.60
requires, and report dev metrics at every checkpoint; ASHA stops weak trials early.

Experiment folder: ``<run.storage_path>/<run.name>/`` holding Tune's state, ``trials/`` (each
trial's training run), ``results.parquet``, ``tune.png`` and ``best.yaml``.
"""

from __future__ import annotations

import math
from pathlib import Path

from negatron.cluster.config import Config, ConfigError

from .results import TuneOutcome, summarize  # noqa: F401 - TuneOutcome is re-exported


def check_space(cfg: Config) -> None:
    """Validate every end of every range and every choice through the config schema.

    Raises:
        ConfigError: naming ``tune.space[key]`` and the bad value.
    """
    if not cfg.tune.space:
        raise ConfigError("tune.space: empty; give at least one key, e.g. loss.temperature: {loguniform: [0.01, 0.5]}")
    if not cfg.data.dev:
        raise ConfigError("data.dev: Tune needs a dev eval folder to report tune.metric")
    from negatron.trainers.tasks import task_for

    task = task_for(cfg)
    if cfg.tune.metric not in task.metrics:
        raise ConfigError(f"tune.metric: {cfg.tune.metric!r} is not reported for model.kind {cfg.model.kind!r}; "
                          f"use one of {', '.join(task.metrics)}")
    for key, spec in cfg.tune.space.items():
        kind, values = next(iter(spec.items()))
        for v in values:
            try:
                cfg.replace({key: v})
            except ConfigError as e:
                detail = str(e).splitlines()[-1].strip()
                raise ConfigError(f"tune.space[{key!r}].{kind}: value {v!r} is not valid: {detail}") from None


def _domain(spec: dict):
    from ray import tune

    kind, a = next(iter(spec.items()))
    if kind == "loguniform":
        return tune.loguniform(a[0], a[1])
    if kind == "uniform":
        return tune.uniform(a[0], a[1])
    if kind == "randint":
        return tune.randint(a[0], a[1] + 1)  # inclusive high, as users read [low, high]
    if kind == "choice":
        return tune.choice(a)
    if kind == "grid":
        return tune.grid_search(a)
    raise AssertionError(kind)


def reports_per_trial(cfg: Config) -> int:
    return math.ceil(cfg.trainer.max_steps / cfg.trainer.checkpoint_every)


def trial_fn(params: dict, base: dict, trials_dir: str) -> None:
    """The Tune function trainable: one whole training run with the sampled overrides.

    ``params`` = {dotted key: sampled value}; ``base`` (the validated config) and ``trials_dir``
    come through ``tune.with_parameters``, so Tune's tables show only the searched values.
    """
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from negatron.trainers.train import run_training

    base = Config.from_dict(base)
    trial_id = tune.get_context().get_trial_id()
    overrides = dict(params)
    overrides.update(overrides.pop("preset", None) or {})
    overrides.update({"run.name": f"train-{trial_id}", "run.storage_path": trials_dir})
    cfg = base.replace(overrides)
    # a trial restarted after its last step (interrupted before Tune marked it finished) resumes
    # at its final checkpoint, whose result the training run reports again (loop.run_worker)
    run_training(cfg, callbacks=[TuneReportCallback()])


def fit_concurrency(cfg: Config) -> None:
    """Refuse a trial that can never be placed; warn when fewer trials than asked can run at once."""
    import ray

    res = ray.cluster_resources()
    total = res.get("CPU", 0)
    per_trial = cfg.tune.trial_cpus + cfg.trainer.num_workers * cfg.trainer.cpus_per_worker
    if per_trial > total:
        raise ConfigError(f"one trial needs {per_trial:g} CPUs (tune.trial_cpus + trainer.num_workers × "
                          f"trainer.cpus_per_worker) but the cluster has {total:g}")
    fits = int(total // per_trial)
    if fits < cfg.tune.max_concurrent_trials:
        print(f"[negatron] {fits} trial(s) fit at once on {total:g} CPUs "
              f"(tune.max_concurrent_trials={cfg.tune.max_concurrent_trials}); the rest wait", flush=True)
    at_once = min(fits, cfg.tune.max_concurrent_trials, cfg.tune.num_samples)
    # the nodes' memory: Ray's task memory plus its object store
    warning = memory_warning(cfg, at_once, res.get("memory", 0) + res.get("object_store_memory", 0))
    if warning:
        print(f"[negatron] warning: {warning}", flush=True)


GIB = 1024 ** 3


def weights_bytes(cfg: Config) -> int:
    """Bytes of the model's weight files (0 when unknown, e.g. the built-in image CNN)."""
    from negatron.trainers.tasks import task_for

    if not task_for(cfg).weights_known(cfg):
        return 0
    try:
        from negatron.trainers.model_io import resolve_model_path

        folder = resolve_model_path(cfg.model.path)
    except Exception:  # noqa: BLE001 - an estimate only; validate_inputs reports a bad path
        return 0
    return sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin") for f in folder.glob(pattern))


def trial_memory_bytes(cfg: Config) -> int:
    """A rough resident-memory estimate of one trial: ~1 GiB for Ray Train's controller and helper
    actors, and per worker ~1 GiB of libraries plus 4 copies of the weights (weights, gradients,
    two AdamW moments; 5 with a momentum key encoder). Measured here for all-MiniLM-L6-v2 (91 MB of
    weights, batch 16): 1.35-1.4 GB per worker, ~3.3 GB per 2-worker trial with six at once."""
    copies = 4 + (1 if cfg.bank.size and cfg.bank.momentum > 0 else 0)
    return int(GIB + cfg.trainer.num_workers * (GIB + copies * weights_bytes(cfg)))


def memory_warning(cfg: Config, at_once: int, memory_bytes: float) -> str | None:
    """A warning when ``at_once`` trials would need more than ``memory_bytes`` (the cluster's
    memory); Ray's memory monitor would otherwise kill workers mid-trial."""
    per = trial_memory_bytes(cfg)
    if at_once < 1 or not memory_bytes or at_once * per <= memory_bytes:
        return None
    fit = max(1, int(memory_bytes // per))
    return (f"{at_once} trials at once may need ~{at_once * per / GIB:.1f} GiB (~{per / GIB:.1f} GiB each: "
            f"{cfg.trainer.num_workers} workers and their model copies) but the cluster has "
            f"{memory_bytes / GIB:.1f} GiB; if Ray kills workers for memory, set "
            f"tune.max_concurrent_trials={fit}")


POINTER = "negatron_pointer.json"


def pbt_trial_fn(params: dict, base: dict, trials_dir: str) -> None:
    """PBT trainable: train in chunks of ``tune.perturbation_interval`` dev reports; after each
    chunk report with a Tune checkpoint. After an exploit, Tune restarts this function with the
    donor's checkpoint and mutated values: the run warm-starts from it with τ and the learning
    rate taken from the new config (so the mutation survives the restore, cf. ray#36660).

    The Tune checkpoint is a pointer (``negatron_pointer.json``: the chunk's own checkpoint, as a
    path or URI, and its step), not a copy of the model: each chunk's run keeps its checkpoint
    in ``trials_dir``, so an exploit copies a few bytes, and the workers of the next chunk fetch
    the weights from the store themselves, on whichever node they run.
    """
    import json
    import tempfile
    import uuid

    from ray import tune

    from negatron.trainers.train import run_training

    cfg = Config.from_dict(base).replace(dict(params))
    trial_id = tune.get_context().get_trial_id()
    chunk = cfg.trainer.checkpoint_every * cfg.tune.perturbation_interval
    init, step = None, 0
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            pointer = Path(d) / POINTER
            pointer = json.loads(pointer.read_text()) if pointer.is_file() else None
        if pointer is not None:
            init, step = pointer["checkpoint"], pointer["step"]
        else:  # an experiment started before pointers: its Tune checkpoint is the model itself
            from negatron.trainers.checkpoint import read_meta

            init = ckpt.to_directory()
            step = read_meta(init)["step"]
    while step < cfg.trainer.max_steps:
        stop = min(cfg.trainer.max_steps, step + chunk)
        c = cfg.replace({"run.name": f"train-{trial_id}-{step:06d}-{uuid.uuid4().hex[:6]}",
                         "run.storage_path": trials_dir, "trainer.keep_checkpoints": 1})
        res = run_training(c, init_checkpoint=init, stop_at=stop)
        init, step = res.checkpoint_dir, stop
        scalars = {k: v for k, v in res.reported.items() if not isinstance(v, list)}
        with tempfile.TemporaryDirectory(prefix="negatron-pbt-") as t:  # Tune copies it into its storage
            (Path(t) / POINTER).write_text(json.dumps({"checkpoint": init, "step": step}))
            tune.report({**scalars, "checkpoint_path": init}, checkpoint=tune.Checkpoint.from_directory(t))


def _scheduler(cfg: Config):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    if cfg.tune.scheduler == "asha":
        from .schedulers import RecheckASHA

        cls = RecheckASHA if cfg.tune.asha_recheck else ASHAScheduler
        return cls(time_attr="training_iteration", max_t=reports_per_trial(cfg),
                   grace_period=min(cfg.tune.grace_period, reports_per_trial(cfg)),
                   reduction_factor=cfg.tune.reduction_factor)
    if cfg.tune.scheduler == "fifo":
        return FIFOScheduler()
    fixed = [k for k in cfg.tune.space if k.startswith("model.") or k in ("bank.size", "model.projection_dim")]
    if fixed:
        raise ConfigError(f"tune.space: PBT cannot mutate {', '.join(fixed)} (a donor's checkpoint "
                          "would not fit); search them with asha or fifo")
    mutations = {k: _domain(v) for k, v in cfg.tune.space.items() if next(iter(v)) != "grid"}
    if not mutations:
        raise ConfigError("tune.space: PBT needs at least one non-grid key to mutate")
    return PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=1,
                                   hyperparam_mutations=mutations, quantile_fraction=0.5,
                                   resample_probability=0.25, synch=False)


def _search_alg(cfg: Config):
    if cfg.tune.search == "random":
        return None
    try:
        from ray.tune.search.optuna import OptunaSearch
        import optuna  # noqa: F401
    except ImportError:
        raise ConfigError("tune.search: 'optuna' needs the optuna package: pip install 'negatron[optuna]'") from None
    return OptunaSearch(seed=cfg.tune.seed)


def run_tune(cfg: Config, address: str | None = None, presets: list[dict] | None = None) -> TuneOutcome:
    """Run (or resume) the experiment described by ``cfg.tune``; write results; return them.

    ``presets``: run exactly these override dicts (one trial each) instead of sampling the space
    (to compare schedulers on the same configurations, as ``bench/tune_budget.py`` does).
    """
    from ray import tune

    from negatron.cluster import console
    from negatron.cluster.local import ensure_ray
    from negatron.cluster import storage
    from negatron.trainers.train import absolute_paths, local_log, run_folder, validate_inputs

    check_space(cfg)
    validate_inputs(cfg, address)
    cfg = absolute_paths(cfg)
    exp_dir = run_folder(cfg)  # a local Path, or a URI on an object store
    console.log_to(local_log(exp_dir))  # Ray's chatter goes here unless --verbose
    ensure_ray(address)
    fit_concurrency(cfg)
    fn = pbt_trial_fn if cfg.tune.scheduler == "pbt" else trial_fn
    trainable = tune.with_resources(
        tune.with_parameters(fn, base=cfg.to_dict(), trials_dir=str(storage.sub(exp_dir, "trials"))),
        {"cpu": cfg.tune.trial_cpus})
    if tune.Tuner.can_restore(str(exp_dir)):
        print(f"[negatron] resuming the experiment in {exp_dir} (finished trials are kept)", flush=True)
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
    else:
        if cfg.tune.search == "random":
            import random

            import numpy as np

            random.seed(cfg.tune.seed)
            np.random.seed(cfg.tune.seed)
        space = ({"preset": tune.grid_search(presets)} if presets
                 else {k: _domain(v) for k, v in cfg.tune.space.items()})
        if presets and cfg.tune.scheduler == "pbt":
            raise ConfigError("tune.scheduler: presets cannot be combined with PBT")
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(metric=cfg.tune.metric, mode=cfg.tune.mode, scheduler=_scheduler(cfg),
                                        search_alg=None if presets else _search_alg(cfg),
                                        num_samples=1 if presets else cfg.tune.num_samples,
                                        max_concurrent_trials=cfg.tune.max_concurrent_trials),
            run_config=tune.RunConfig(name=cfg.run.name, storage_path=cfg.run.storage_path,
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
    grid = tuner.fit()
    return summarize(grid, cfg, exp_dir)
