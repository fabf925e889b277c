"""Hard negatives and rerankers on the built-in stdlib data. Prints JSON.

1. bi-encoder A: the quickstart recipe with in-batch negatives only (no bank);
2. mine hard negatives for the train pairs with A (`negatron mine`);
3. bi-encoder B: the same recipe on the mined file (hard negatives join the candidates);
4. a cross-encoder trained on the mined file (listwise loss, 2 Ray Train workers, initialised
   from A with a fresh head; the quickstart's reranker recipe), reranking the top ``--depth`` of A
   and of B: alone, and fused with the bi-encoder's scores at the weight chosen on dev.

Test MRR@10 of every stage. Target: the reranker stage adds MRR@10 over its bi-encoder.

    .venv/bin/python bench/rerank_quality.py [--steps 120] [--reranker-steps 300] [--depth 20] [--skip-b]
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
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--reranker-steps", type=int, default=300, help="0 = compare the bi-encoders only")
    ap.add_argument("--skip-b", action="store_true", help="no bi-encoder B (the hard-negative retrain)")
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--negatives", type=int, default=1, help="data.num_negatives for bi-encoder B")
    ap.add_argument("--data", default=None, help="an existing `negatron data stdlib` folder")
    args = ap.parse_args()

    import torch

    from negatron.trainers.recipes import reranker_stage
    from negatron.cluster.config import load_config
    from negatron.cluster.local import ensure_ray
    from negatron.trainers.cross_encoder import CrossEncoder
    from negatron.trainers.encoder import Encoder
    from negatron.trainers.evaluate import evaluate_encoder, evaluate_two_stage
    from negatron.trainers.stdlib_data import build_stdlib_dataset
    from negatron.trainers.train import run_training

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        data = Path(args.data) if args.data else tmp / "data"
        if not args.data:
            build_stdlib_dataset(data)
        ensure_ray()
        qs = Path(__file__).resolve().parent.parent / "cluster" / "quickstart.yaml"
        base = load_config(qs, [f"data.train={data / 'train.parquet'}", f"data.dev={data / 'dev'}",
                                f"data.test={data / 'test'}", "bank.size=0", "bank.momentum=0.0",
                                f"trainer.max_steps={args.steps}", f"trainer.checkpoint_every={args.steps}",
                                f"run.storage_path={tmp / 'runs'}", "trainer.log_every_s=60"])
        test = str(data / "test")
        qlen = base.model.query_max_length or None
        out: dict = {"steps": args.steps, "reranker_steps": args.reranker_steps, "depth": args.depth}

        a = run_training(base.replace({"run.name": "in_batch"}))
        out["bi_in_batch"] = evaluate_encoder(Encoder.from_pretrained(str(a.final_dir)), test, query_max_length=qlen,
                                              progress=False)["mrr@10"]
        print(json.dumps({"bi_in_batch": out["bi_in_batch"]}), file=sys.stderr, flush=True)

        if args.reranker_steps:
            rr = reranker_stage(base, Path(a.final_dir), data, tmp, steps=args.reranker_steps, depth=args.depth)
            out["mined"] = rr["mined"]
            w = out["rerank_weight"] = rr["rerank_weight"]
            out["dev_mrr@10_by_weight"] = rr["dev_mrr@10_by_weight"]
            out["bi_in_batch_plus_reranker"] = rr["reranked"]["mrr@10"]
            out["bi_in_batch_plus_reranker_fused"] = rr[f"reranked@w={w:g}"]["mrr@10"]
            out["reranker_gain_over_in_batch"] = out["bi_in_batch_plus_reranker_fused"] - out["bi_in_batch"]
            out["wall_s"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(out), file=sys.stderr, flush=True)
            if args.skip_b:
                print(json.dumps(out, indent=2))
                return
        else:  # hard negatives only (no reranker stage)
            from negatron.trainers.mine import mine

            out["mined"] = mine(str(a.final_dir), data / "train.parquet", tmp / "mined.parquet", k=40, skip=3, take=7,
                                max_length=base.model.max_length)

        b = run_training(base.replace({"run.name": "hard_negatives", "data.train": str(tmp / "mined.parquet"),
                                       "data.negatives_corpus": out["mined"]["negatives_corpus"],
                                       "data.num_negatives": args.negatives}))
        enc_b = Encoder.from_pretrained(str(b.final_dir))
        out["bi_hard_negatives"] = evaluate_encoder(enc_b, test, query_max_length=qlen, progress=False)["mrr@10"]
        out["wall_s"] = round(time.perf_counter() - t0, 1)
        if not args.reranker_steps:
            print(json.dumps(out, indent=2))
            return
        two_b = evaluate_two_stage(enc_b, CrossEncoder.from_pretrained(rr["reranker"]), test, depth=args.depth,
                                   query_max_length=qlen, progress=False, weights=(1.0, w))
        out["bi_hard_negatives_plus_reranker"] = two_b["reranked"]["mrr@10"]
        out["bi_hard_negatives_plus_reranker_fused"] = two_b[f"reranked@w={w:g}"]["mrr@10"]
        out["reranker_gain_over_hard_negatives"] = out["bi_hard_negatives_plus_reranker_fused"] - out["bi_hard_negatives"]
        out["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
