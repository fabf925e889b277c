"""Does contrastive pretraining help on images? Frozen-feature accuracy on scikit-learn's digits
(test split) of: the random-init CNN, SimCLR without a bank, and SimCLR with the momentum memory
bank (MoCo v2 style). Real Ray Train runs (2 workers). Prints JSON.

    .venv/bin/python bench/image_quality.py [--steps 300] [--config configs/digits.yaml]

Metrics: k-NN accuracy on the embeddings, the full linear probe and the few-shot probe
(``eval.probe_shots`` labelled images per class; mean of 5 draws). Target: pretraining beats the
random-init probe by >= 10 points.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs" / "digits.yaml"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--bank", type=int, default=1024, help="bank.size of the bank run")
    ap.add_argument("overrides", nargs="*", help="extra a.b=value overrides for both runs")
    args = ap.parse_args()

    import ray

    from negatron.cluster.config import load_config
    from negatron.trainers.images import ImageEval, build_digits_dataset
    from negatron.trainers.loop import build_encoder
    from negatron.trainers.train import run_training

    keys = ("knn_acc", "probe_acc", "fewshot_probe_acc")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        build_digits_dataset(tmp / "digits")
        base = [f"data.train={tmp / 'digits' / 'train.parquet'}", f"data.dev={tmp / 'digits' / 'eval'}",
                f"trainer.max_steps={args.steps}", f"run.storage_path={tmp}", "trainer.keep_checkpoints=1",
                "trainer.log_every_s=60", *args.overrides]
        cfg = load_config(args.config, base)
        ev = ImageEval.load(cfg.data.dev)
        out = {"config": os.path.relpath(args.config, ROOT), "steps": args.steps, "probe_shots": cfg.eval.probe_shots,
               "overrides": args.overrides, "runs": {}}
        out["runs"]["random_init"] = {k: round(v, 4) for k, v in
                                      ev.evaluate(build_encoder(cfg), shots=cfg.eval.probe_shots).items()}
        from negatron.cluster.local import init_local  # workers know their own cluster's address
        init_local(num_cpus=4, include_dashboard=True, logging_level="ERROR", log_to_driver=False)
        try:
            for name, bank in (("simclr_no_bank", 0), ("simclr_bank", args.bank)):
                res = run_training(cfg.replace([f"bank.size={bank}", f"run.name={name}"]))
                out["runs"][name] = {**{k: round(res.metrics[k], 4) for k in keys}, "bank_size": bank,
                                     "wall_s": res.metrics["wall_s"], "samples_per_s": round(res.metrics["samples_per_s"], 1)}
        finally:
            ray.shutdown()
    r = out["runs"]
    best = max(r["simclr_no_bank"]["fewshot_probe_acc"], r["simclr_bank"]["fewshot_probe_acc"])
    out["fewshot_probe_gain_points"] = round(100 * (best - r["random_init"]["fewshot_probe_acc"]), 1)
    out["probe_gain_points"] = round(100 * (max(r["simclr_no_bank"]["probe_acc"], r["simclr_bank"]["probe_acc"])
                                            - r["random_init"]["probe_acc"]), 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
