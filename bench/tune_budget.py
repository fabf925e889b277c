"""ASHA versus running every trial to the end, on the same sampled configurations. Prints JSON.

    .venv/bin/python bench/tune_budget.py [--config configs/tune_quickstart.yaml] [--trials 6]

Both experiments run the identical list of configurations (drawn once from the config's
``tune.space`` with a seed), each trial a 2-worker Ray Train run on the stdlib data. Reported:
wall time of each, the best dev MRR@10 each finds, and the ratios.
Target: ASHA within 0.01 MRR@10 of the full run's best in <= 50% of its time.

Measured setting that meets it (``docs/tune_budget_recheck_result.json``)::

    .venv/bin/python bench/tune_budget.py trainer.max_steps=64 tune.reduction_factor=3 \
        tune.max_concurrent_trials=6 trainer.cpus_per_worker=0.25

Every trial starts at once, so trials reach each rung together and ASHA's rechecks (see
``negatron.tune.schedulers``) cut the weak ones right there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def sample_presets(cfg, n: int, seed: int = 0) -> list[dict]:
    """``n`` configurations drawn from ``cfg.tune.space`` (to rerun the same ones elsewhere)."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = {}
        for key, spec in cfg.tune.space.items():
            kind, a = next(iter(spec.items()))
            if kind == "loguniform":
                p[key] = math.exp(rng.uniform(math.log(a[0]), math.log(a[1])))
            elif kind == "uniform":
                p[key] = rng.uniform(a[0], a[1])
            elif kind == "randint":
                p[key] = rng.randint(a[0], a[1])
            else:
                p[key] = rng.choice(a)
        out.append(p)
    return out


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(Path(__file__).resolve().parent.parent / "configs" / "tune_quickstart.yaml"))
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", default=None, help="copy each experiment's results.parquet and tune.png here")
    ap.add_argument("--runs", default="asha,fifo", help="asha,fifo (the ratio needs both), or one of them")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    import ray

    from negatron.cluster.config import load_config
    from negatron.cluster.local import ensure_ray
    from negatron.trainers.stdlib_data import build_stdlib_dataset
    from negatron.tune.search import run_tune

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        build_stdlib_dataset(tmp / "data")
        cfg = load_config(args.config, [f"data.train={tmp / 'data' / 'train.parquet'}", f"data.dev={tmp / 'data' / 'dev'}",
                                        f"run.storage_path={tmp / 'exp'}", *args.overrides])
        presets = sample_presets(cfg, args.trials, args.seed)
        ensure_ray()
        out = {"config": os.path.relpath(args.config, Path(__file__).resolve().parent.parent), "trials": args.trials,
               "overrides": args.overrides, "max_concurrent_trials": cfg.tune.max_concurrent_trials,
               "asha": {"reduction_factor": cfg.tune.reduction_factor, "grace_period": cfg.tune.grace_period,
                        "recheck": cfg.tune.asha_recheck},
               "presets": presets, "runs": {}}
        try:
            for sched in [r for r in ("asha", "fifo") if r in args.runs.split(",")]:
                c = cfg.replace({"tune.scheduler": sched, "run.name": f"budget-{sched}"})
                t0 = time.perf_counter()
                res = run_tune(c, presets=presets)
                wall = time.perf_counter() - t0
                out["runs"][sched] = {
                    "wall_s": round(wall, 1), "best_dev_mrr@10": res.best_metric,
                    "stopped_early": sum(r["status"] == "STOPPED_EARLY" for r in res.rows),
                    "steps_run": sum(r["step"] or 0 for r in res.rows),
                    "trials": [{k: r.get(k) for k in ("trial_id", *cfg.tune.space, "dev_mrr@10", "step", "status")}
                               for r in res.rows],
                }
                if args.keep:
                    import shutil

                    dst = Path(args.keep) / sched
                    dst.mkdir(parents=True, exist_ok=True)
                    for name in ("results.parquet", "tune.png", "best.yaml"):
                        if (res.experiment_dir / name).is_file():
                            shutil.copy(res.experiment_dir / name, dst / name)
        finally:
            ray.shutdown()
    if len(out["runs"]) < 2:
        return out
    a, f = out["runs"]["asha"], out["runs"]["fifo"]
    out["time_ratio_asha_vs_full"] = a["wall_s"] / f["wall_s"]
    out["mrr_gap_full_minus_asha"] = f["best_dev_mrr@10"] - a["best_dev_mrr@10"]
    return out


if __name__ == "__main__":
    # Tune's tables and Ray's forwarded worker lines (which can arrive after a run returns) go to
    # stderr for the whole run: stdout holds only the JSON
    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        result = main()
    real_stdout.write(json.dumps(result, indent=2) + "\n")
