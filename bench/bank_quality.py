"""Does the memory bank buy the quality of a bigger batch? Test MRR@10 on a built-in dataset
(stdlib, or pycode where the bank is far smaller than the training set) after the same number of
steps for: batch 16 without bank, batch 16 with a bank of K entries, a bigger batch (64 by default)
without bank, and optionally that bigger batch through the cached loss (``trainer.mini_batch_size``).
Real Ray Train runs (2 workers), the packaged all-MiniLM-L6-v2. Prints JSON (also rewritten to
``--out`` after every run, so a long bench that is stopped keeps what it measured).

    .venv/bin/python bench/bank_quality.py [--dataset stdlib|pycode] [--data DIR] [--steps 60]
        [--big 64] [--bank-size 4096] [--runs b16,b16_bank4096,b64,b64_cached]
        [--model default] [--momentum M] [--prefill] [--lr 5e-5] [--warmup 5] [--seq 128] [--out F]

Target: the bank closes at least half the gap between batch 16 and the bigger batch:
``gap_closed = (mrr_b16_bank - mrr_b16) / (mrr_big - mrr_b16)``. The cached run computes the same
loss and gradients as the plain big batch (tests/test_gradcache.py checks 1e-5), so its quality
differs only by floating-point order; it is there to show the memory side at equal quality.
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
    ap.add_argument("--dataset", default="stdlib", choices=["stdlib", "pycode"],
                    help="built-in dataset to build when --data is not given")
    ap.add_argument("--big", type=int, default=64, help="the bigger global batch the bank is compared with")
    ap.add_argument("--bank-size", type=int, default=4096)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", default=None, help="also write the JSON here after every run")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--momentum", type=float, default=0.99, help="bank.momentum for the bank run")
    ap.add_argument("--bank-weight", type=float, default=None, help="bank.weight for the bank run (default: averaged terms)")
    ap.add_argument("--seed", type=int, default=0, help="trainer.seed (data order, dropout) for every run")
    ap.add_argument("--prefill", action="store_true", help="bank.prefill=true for the bank run (starts full)")
    ap.add_argument("--data", default=None, help="an existing `negatron data stdlib|pycode` folder")
    ap.add_argument("--temperature", type=float, default=None, help="loss.temperature for every run")
    ap.add_argument("--runs", default=None,
                    help="comma-separated subset of b16,b16_bankK,bBIG,bBIG_cached "
                         "(default: the first three; the gap needs them)")
    args = ap.parse_args()

    import ray
    import torch

    from negatron.cluster.config import load_config
    from negatron.trainers.encoder import Encoder
    from negatron.trainers.evaluate import evaluate_encoder
    from negatron.trainers.stdlib_data import build_pycode_dataset, build_stdlib_dataset
    from negatron.trainers.train import run_training

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        data = Path(args.data) if args.data else tmp / "data"
        if not args.data:
            (build_pycode_dataset if args.dataset == "pycode" else build_stdlib_dataset)(data)
        # dashboard on, as in the product: Ray Train's placement-group cleaner needs the state API
        from negatron.cluster.local import init_local  # workers know their own cluster's address
        init_local(num_cpus=4, include_dashboard=True, logging_level="ERROR", log_to_driver=False)
        bank_run, big_run = f"b16_bank{args.bank_size}", f"b{args.big}"
        arms = [("b16", 16, 0, 0), (bank_run, 16, args.bank_size, 0), (big_run, args.big, 0, 0),
                (f"{big_run}_cached", args.big, 0, 16)]
        wanted = set((args.runs or f"b16,{bank_run},{big_run}").split(","))
        unknown = wanted - {a[0] for a in arms}
        if unknown:
            ap.error(f"--runs: unknown {sorted(unknown)}; choose from {[a[0] for a in arms]}")
        n_train = __import__("pyarrow.parquet").parquet.read_metadata(data / "train.parquet").num_rows
        out = {"dataset": str(data) if args.data else args.dataset, "train_pairs": n_train,
               "bank_size": args.bank_size, "big_batch": args.big, "warmup_steps": args.warmup,
               "model": args.model, "steps": args.steps, "lr": args.lr, "seq_len": args.seq,
               "bank_momentum": args.momentum, "bank_weight": args.bank_weight, "bank_prefill": args.prefill, "seed": args.seed,
               "runs": {}}
        try:
            for name, batch, bank, mini in arms:
                if name not in wanted:
                    continue
                t0 = time.perf_counter()
                cfg = load_config(None, [
                    f"model.path={args.model}", f"data.train={data / 'train.parquet'}",
                    "trainer.num_workers=2", f"trainer.batch_size={batch // 2}", f"trainer.max_steps={args.steps}",
                    f"trainer.checkpoint_every={args.steps}", f"bank.size={bank}",
                    f"bank.momentum={args.momentum if bank else 0.0}", f"optim.lr={args.lr}",
                    f"model.max_length={args.seq}", "model.query_max_length=48", f"optim.warmup_steps={args.warmup}",
                    f"trainer.mini_batch_size={mini}",
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
                print(json.dumps({name: out["runs"][name]}), flush=True)
                if args.out:
                    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        finally:
            ray.shutdown()
    r = out["runs"]
    if {"b16", bank_run, big_run} <= set(r):
        gap = r[big_run]["test_mrr@10"] - r["b16"]["test_mrr@10"]
        out[f"gap_{big_run}_minus_b16"] = gap
        out["gap_closed_by_bank"] = (r[bank_run]["test_mrr@10"] - r["b16"]["test_mrr@10"]) / gap if gap else None
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
