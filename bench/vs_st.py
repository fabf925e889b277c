"""Negatron's default recipe against sentence-transformers at equal budget. Prints JSON.

On the built-in stdlib data and on pycode, the same starting model (the packaged all-MiniLM-L6-v2),
the same training pairs, the same samples seen (steps × batch), learning rate, warm-up, max length
and τ (sentence-transformers' scale = 1/τ):

- ``st_mnrl``: sentence-transformers' trainer with MultipleNegativesRankingLoss (batch B, the
  no-duplicates batch sampler its docs recommend for this loss);
- ``st_cached``: the same with CachedMultipleNegativesRankingLoss at a 4× larger batch (mini-batch
  B), for a quarter of the steps — the same samples seen;
- ``negatron``: Negatron's default recipe, ``configs/quickstart.yaml`` (2 Ray Train workers, the
  shared bank), with ``--set`` overrides on top (ablations);
- ``negatron_plain``: Negatron with 1 worker, batch B, no bank, no momentum encoder.

Every model, and the starting model (``zero_shot``), is scored by the same code
(``negatron eval``'s metrics on the test split). Seeds fix data order and dropout of each run.

    .venv/bin/pip install -e ".[dev,bench]"   # sentence-transformers' trainer needs datasets, accelerate
    .venv/bin/python bench/vs_st.py [--datasets stdlib,pycode] [--seeds 0,1] [--steps 200]
        [--batch 32] [--runs zero_shot,st_mnrl,st_cached,negatron,negatron_plain]
        [--set bank.weight=1 ...] [--data-root runs/bench_data] [--out result.json]

The datasets are built once under ``--data-root`` and reused. The JSON is rewritten after every
run, so a long bench that is stopped keeps what it measured. About 4–8 min per run on 2 CPU cores.
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
os.environ.setdefault("WANDB_DISABLED", "true")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QUICKSTART = str(ROOT / "cluster" / "quickstart.yaml")  # what `negatron quickstart` runs (= configs/quickstart.yaml)
RUNS = ("zero_shot", "st_mnrl", "st_cached", "negatron", "negatron_plain")
METRICS = ("mrr@10", "ndcg@10", "recall@1", "recall@10")


def dataset(name: str, root: Path) -> Path:
    from negatron.trainers.stdlib_data import build_pycode_dataset, build_stdlib_dataset

    d = root / name
    if not (d / "train.parquet").is_file():
        print(f"[vs_st] building {name} in {d}", file=sys.stderr, flush=True)
        (build_stdlib_dataset if name == "stdlib" else build_pycode_dataset)(d)
    return d


def train_pairs(data: Path) -> tuple[list[str], list[str]]:
    import pyarrow.parquet as pq

    t = pq.read_table(data / "train.parquet", columns=["query", "positive"])
    return t.column("query").to_pylist(), t.column("positive").to_pylist()


def run_st(data: Path, out: Path, args, seed: int, cached: bool) -> Path:
    """sentence-transformers' own trainer, as its docs show it; returns the saved folder."""
    import datasets
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments, losses)
    from sentence_transformers.training_args import BatchSamplers

    from negatron.trainers.model_io import resolve_model_path

    q, p = train_pairs(data)
    model = SentenceTransformer(str(resolve_model_path(args.model)), device="cpu")
    model.max_seq_length = args.max_length
    scale = 1.0 / args.temperature
    if cached:
        loss = losses.CachedMultipleNegativesRankingLoss(model, scale=scale, mini_batch_size=args.batch)
        batch, steps, warmup = args.batch * 4, max(1, args.steps // 4), max(1, round(args.warmup / 4))
    else:
        loss = losses.MultipleNegativesRankingLoss(model, scale=scale)
        batch, steps, warmup = args.batch, args.steps, args.warmup
    targs = SentenceTransformerTrainingArguments(
        output_dir=str(out / "st_out"), max_steps=steps, per_device_train_batch_size=batch,
        learning_rate=args.lr, warmup_steps=warmup, lr_scheduler_type="linear", seed=seed, data_seed=seed,
        batch_sampler=BatchSamplers.NO_DUPLICATES, save_strategy="no", report_to="none", logging_steps=25,
        use_cpu=True, dataloader_drop_last=True, disable_tqdm=True)
    ds = datasets.Dataset.from_dict({"anchor": q, "positive": p})
    SentenceTransformerTrainer(model=model, args=targs, train_dataset=ds, loss=loss).train()
    model.save(str(out / "model"))
    return out / "model"


def run_negatron(data: Path, out: Path, args, seed: int, plain: bool) -> Path:
    from negatron.cluster.config import load_config
    from negatron.trainers.train import run_training

    sets = [f"data.train={data / 'train.parquet'}", f"data.dev={data / 'dev'}", f"data.test={data / 'test'}",
            f"model.path={args.model}", f"model.max_length={args.max_length}", f"trainer.max_steps={args.steps}",
            f"trainer.checkpoint_every={args.steps}", f"trainer.seed={seed}", f"optim.lr={args.lr}",
            f"optim.warmup_steps={args.warmup}", f"loss.temperature={args.temperature}", "trainer.log_every_s=60",
            f"run.storage_path={out}", "run.name=run"]
    if plain:
        sets += ["trainer.num_workers=1", f"trainer.batch_size={args.batch}", "trainer.cpus_per_worker=1",
                 f"trainer.torch_threads={args.threads}", "bank.size=0", "bank.momentum=0.0"]
    else:
        cfg0 = load_config(QUICKSTART, [])
        per_worker = args.batch // cfg0.trainer.num_workers
        sets += [f"trainer.batch_size={per_worker}"] + list(args.set)
    cfg = load_config(None if plain else QUICKSTART, sets)
    return Path(run_training(cfg).final_dir)


def score(folder: str, data: Path, args) -> dict:
    from negatron.trainers.encoder import Encoder
    from negatron.trainers.evaluate import evaluate_encoder

    enc = Encoder.from_pretrained(str(folder), max_length=args.max_length)
    m = evaluate_encoder(enc, str(data / "test"), query_max_length=args.max_length, progress=False)
    return {k: round(float(m[k]), 4) for k in METRICS} | {"num_queries": int(m["num_queries"]),
                                                            "num_docs": int(m["num_docs"])}


def summarize(res: dict) -> dict:
    """Per dataset and run: the mean over seeds of each metric, and the MRR@10 gain over zero-shot."""
    out = {}
    for ds, by_run in res["results"].items():
        zs = by_run.get("zero_shot", {}).get("0", {}).get("mrr@10")
        out[ds] = {}
        for run, by_seed in by_run.items():
            vals = [v["mrr@10"] for v in by_seed.values() if "mrr@10" in v]
            if not vals:
                continue
            mean = sum(vals) / len(vals)
            out[ds][run] = {"mrr@10_mean": round(mean, 4), "seeds": len(vals),
                            "gain_over_zero_shot": None if zs is None else round(mean - zs, 4)}
        neg, st = out[ds].get("negatron"), out[ds].get("st_mnrl")
        if neg and st:
            seeds = set(by_run["negatron"]) & set(by_run["st_mnrl"])
            out[ds]["negatron_ge_st_every_seed"] = all(
                by_run["negatron"][s]["mrr@10"] >= by_run["st_mnrl"][s]["mrr@10"] for s in seeds)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", default="stdlib,pycode")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--model", default="default")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32, help="global batch (Negatron's recipe splits it over its workers)")
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the in-process runs")
    ap.add_argument("--set", action="append", default=[], help="a.b=v override of the negatron run (repeatable)")
    ap.add_argument("--data-root", default=str(ROOT / "runs" / "bench_data"))
    ap.add_argument("--out", default=None, help="write the JSON here too (after every run)")
    args = ap.parse_args()

    import ray
    import torch

    torch.set_num_threads(args.threads)
    runs = [r for r in args.runs.split(",") if r]
    bad = [r for r in runs if r not in RUNS]
    if bad:
        sys.exit(f"vs_st: unknown run(s) {bad}; choose from {RUNS}")
    seeds = [int(s) for s in args.seeds.split(",")]
    res = {"bench": "vs_st", "model": args.model, "steps": args.steps, "batch": args.batch, "lr": args.lr,
           "warmup": args.warmup, "max_length": args.max_length, "temperature": args.temperature,
           "negatron_config": "cluster/quickstart.yaml", "negatron_overrides": args.set,
           "cpu_count": os.cpu_count(), "results": {}, "seconds": {}}

    def emit() -> None:
        res["summary"] = summarize(res)
        text = json.dumps(res, indent=2)
        if args.out:
            Path(args.out).write_text(text + "\n")
        return text

    if any(r.startswith("negatron") for r in runs):
        from negatron.cluster.local import init_local  # workers know their own cluster's address
        init_local(num_cpus=4, include_dashboard=True, logging_level="ERROR", log_to_driver=False)
    try:
        for ds in args.datasets.split(","):
            data = dataset(ds, Path(args.data_root))
            per = res["results"].setdefault(ds, {})
            for run in runs:
                for seed in ([0] if run == "zero_shot" else seeds):
                    t0 = time.perf_counter()
                    print(f"[vs_st] {ds} {run} seed {seed}", file=sys.stderr, flush=True)
                    with tempfile.TemporaryDirectory() as d:
                        out = Path(d)
                        if run == "zero_shot":
                            folder = args.model
                        elif run.startswith("st_"):
                            folder = run_st(data, out, args, seed, cached=run == "st_cached")
                        else:
                            folder = run_negatron(data, out, args, seed, plain=run == "negatron_plain")
                        per.setdefault(run, {})[str(seed)] = score(folder, data, args)
                    res["seconds"][f"{ds}/{run}/{seed}"] = round(time.perf_counter() - t0, 1)
                    print(f"[vs_st] {ds} {run} seed {seed}: {per[run][str(seed)]['mrr@10']}", file=sys.stderr, flush=True)
                    emit()
    finally:
        if ray.is_initialized():
            ray.shutdown()
    print(emit())


if __name__ == "__main__":
    main()
