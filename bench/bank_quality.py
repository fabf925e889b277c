"""Does the memory bank buy the quality of a bigger batch? Test MRR@10 on the built-in stdlib data
after the same number of steps for: batch 16 without bank, batch 16 with bank K=4096, batch 64
without bank. Real Ray Train runs (2 workers), the packaged all-MiniLM-L6-v2. Prints JSON.

    .venv/bin/python bench/bank_quality.py [--steps 60] [--model default] [--momentum M] [--prefill]

Target: the bank closes at least half the gap between batch 16 and batch 64:
``gap_closed = (mrr_b16_bank - mrr_b16) / (mrr_b64 - mrr_b16)``.
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--momentum", type=float, default=0.99, help="bank.momentum for the bank run")
    ap.add_argument("--bank-weight", type=float, default=None, help="bank.weight for the bank run (default: averaged terms)")
    ap.add_argument("--seed", type=int, default=0, help="trainer.seed (data order, dropout) for every run")
    ap.add_argument("--prefill", action="store_true", help="bank.prefill=true for the bank run (starts full)")
    ap.add_argument("--data", default=None, help="an existing `negatron data stdlib` folder")
    ap.add_argument("--temperature", type=float, default=None, help="loss.temperature for every run")
    ap.add_argument("--runs", default="b16,b16_bank4096,b64",
                    help="comma-separated subset of b16,b16_bank4096,b64 (the gap needs all three)")
    args = ap.parse_args()

    import ray
    import torch

    from negatron.cluster.config import load_config
    from negatron.trainers.encoder import Encoder
    from negatron.trainers.evaluate import evaluate_encoder
    from negatron.trainers.stdlib_data import build_stdlib_dataset
    from negatron.trainers.train import run_training

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        data = Path(args.data) if args.data else tmp / "data"
        if not args.data:
            build_stdlib_dataset(data)
        # dashboard on, as in the product: Ray Train's placement-group cleaner needs the state API
        ray.init(address="local", num_cpus=4, include_dashboard=True, logging_level="ERROR", log_to_driver=False)
        out = {"model": args.model, "steps": args.steps, "lr": args.lr, "seq_len": args.seq,
               "bank_momentum": args.momentum, "bank_weight": args.bank_weight, "bank_prefill": args.prefill, "seed": args.seed,
               "runs": {}}
        try:
            wanted = set(args.runs.split(","))
            for name, batch, bank in [("b16", 16, 0), ("b16_bank4096", 16, 4096), ("b64", 64, 0)]:
                if name not in wanted:
                    continue
                t0 = time.perf_counter()
                cfg = load_config(None, [
                    f"model.path={args.model}", f"data.train={data / 'train.parquet'}",
                    "trainer.num_workers=2", f"trainer.batch_size={batch // 2}", f"trainer.max_steps={args.steps}",
                    f"trainer.checkpoint_every={args.steps}", f"bank.size={bank}",
                    f"bank.momentum={args.momentum if bank else 0.0}", f"optim.lr={args.lr}",
                    f"model.max_length={args.seq}", "model.query_max_length=48", "optim.warmup_steps=5",
                    "trainer.log_every_s=30", f"trainer.seed={args.seed}", f"run.storage_path={tmp / 'runs'}", f"run.name={name}"]
                    + ([f"loss.temperature={args.temperature}"] if args.temperature else [])
                    + ([f"bank.weight={args.bank_weight}"] if bank and args.bank_weight is not None else [])
                    + (["bank.prefill=true"] if bank and args.prefill else []))
                res = run_training(cfg)
                m = evaluate_encoder(Encoder.from_pretrained(str(res.final_dir)), str(data / "test"),
                                     query_max_length=48, progress=False)
                out["runs"][name] = {"test_mrr@10": m["mrr@10"], "test_recall@10": m["recall@10"],
                                     "train_wall_s": round(time.perf_counter() - t0, 1),
                                     "samples_per_s": res.metrics["samples_per_s"]}
        finally:
            ray.shutdown()
    r = out["runs"]
    if len(r) < 3:
        print(json.dumps(out, indent=2))
        return
    gap = r["b64"]["test_mrr@10"] - r["b16"]["test_mrr@10"]
    out["gap_b64_minus_b16"] = gap
    out["gap_closed_by_bank"] = (r["b16_bank4096"]["test_mrr@10"] - r["b16"]["test_mrr@10"]) / gap if gap else None
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
