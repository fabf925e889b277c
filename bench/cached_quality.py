"""A truly larger batch (the cached loss) against the memory bank, at the same number of samples
seen; test MRR@10 on the built-in stdlib data; prints JSON.

    .venv/bin/python bench/cached_quality.py [--samples 5120] [--mini-batch 32] [--runs ...] [--out FILE]

Real Ray Train runs (2 workers), the packaged all-MiniLM-L6-v2, the same data order seed, learning
rate, τ, lengths and 10 % warm-up:

- ``b32``: global batch 32 (16 per worker), no bank;
- ``b32_bank``: the same with a prefilled K=4096 bank (moco mode, momentum 0.99);
- ``b256_cached``: global batch 256 through the cached loss (``trainer.mini_batch_size``), no
  bank, for 1/8 of the steps.

Each final model is scored on the test split (948 queries, 1,896 docs) with ``negatron eval``'s
evaluator.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RUNS = {  # name: (global batch, bank size, mini-batch size or 0)
    "b32": (32, 0, 0),
    "b32_bank": (32, 4096, 0),
    "b256_cached": (256, 0, -1),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=5120, help="training samples seen by every run")
    ap.add_argument("--mini-batch", type=int, default=32, help="trainer.mini_batch_size of the cached run")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--data", default=None, help="an existing `negatron data stdlib` folder")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()

    import ray
    import torch

    from negatron.cluster.config import load_config
    from negatron.trainers.encoder import Encoder
    from negatron.trainers.evaluate import evaluate_encoder
    from negatron.trainers.stdlib_data import build_stdlib_dataset
    from negatron.trainers.train import run_training

    torch.set_num_threads(2)
    out = {"model": "all-MiniLM-L6-v2", "samples": args.samples, "lr": args.lr, "seed": args.seed, "workers": 2,
           "runs": {}}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        data = Path(args.data) if args.data else tmp / "data"
        if not args.data:
            build_stdlib_dataset(data)
        from negatron.cluster.local import init_local  # workers know their own cluster's address
        init_local(num_cpus=4, include_dashboard=True, logging_level="ERROR", log_to_driver=False)
        try:
            zero = evaluate_encoder(Encoder.from_pretrained("default"), str(data / "test"), query_max_length=48,
                                    progress=False)
            out["zero_shot_test_mrr@10"] = zero["mrr@10"]
            for name in args.runs.split(","):
                batch, bank, mini = RUNS[name]
                steps = args.samples // batch
                t0 = time.perf_counter()
                cfg = load_config(None, [
                    f"data.train={data / 'train.parquet'}", "trainer.num_workers=2", f"trainer.batch_size={batch // 2}",
                    f"trainer.max_steps={steps}", f"trainer.checkpoint_every={steps}", f"bank.size={bank}",
                    f"bank.momentum={0.99 if bank else 0.0}", f"bank.prefill={'true' if bank else 'false'}",
                    f"trainer.mini_batch_size={args.mini_batch if mini else 0}", f"optim.lr={args.lr}",
                    "model.max_length=128", "model.query_max_length=48", f"optim.warmup_steps={max(1, steps // 10)}",
                    "trainer.log_every_s=30", f"trainer.seed={args.seed}", f"run.storage_path={tmp / 'runs'}",
                    f"run.name={name}"])
                res = run_training(cfg)
                m = evaluate_encoder(Encoder.from_pretrained(str(res.final_dir)), str(data / "test"),
                                     query_max_length=48, progress=False)
                out["runs"][name] = {"global_batch": batch, "steps": steps, "bank": bank,
                                     "mini_batch_size": args.mini_batch if mini else 0,
                                     "test_mrr@10": round(m["mrr@10"], 4), "test_ndcg@10": round(m["ndcg@10"], 4),
                                     "test_recall@1": round(m["recall@1"], 4),
                                     "train_wall_s": round(time.perf_counter() - t0, 1),
                                     "samples_per_s": res.metrics["samples_per_s"]}
                print(json.dumps({name: out["runs"][name]}), file=sys.stderr)
        finally:
            ray.shutdown()
    from emit import emit  # bench/ is on sys.path when a bench runs as a script

    emit(out, args.out)


if __name__ == "__main__":
    main()
