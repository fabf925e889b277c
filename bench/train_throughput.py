"""Training throughput: Negatron (1 and 2 Ray Train workers, with and without a K=4096 bank) versus
a plain single-process PyTorch loop and sentence-transformers' MultipleNegativesRankingLoss, same
model, batch and sequence length, measured in one run. Prints JSON.

    .venv/bin/python bench/train_throughput.py [--model default|tiny] [--steps 12] [--batch 32] [--seq 64]

Samples/s exclude start-up: the first steps are warm-up and are not timed. Every variant trains on
the same rows: the global batches of Negatron's own seeded data order, so all are timed on texts of
the same lengths. All single-process variants use one torch thread, like one Ray Train worker (Ray
sets OMP_NUM_THREADS=1).

Two-worker decomposition (plain loops in two processes, each on its half of every global batch):
side by side without talking (the machine's ceiling), then waiting for each other after every
backward pass (what synchronous steps cost when the halves differ in length), then averaging their
gradients in one flat gloo all-reduce (the plainest DDP). Negatron's 2 workers are measured against
each; `--skip side,sync` leaves them out.
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

import torch  # noqa: E402


def _data(tmp: Path) -> Path:
    from negatron.trainers.stdlib_data import build_stdlib_dataset

    build_stdlib_dataset(tmp / "data")
    return tmp / "data" / "train.parquet"


def _model_path(name: str, tmp: Path) -> str:
    if name == "default":
        return "default"
    from tests.helpers import make_tiny_encoder

    out = tmp / "tiny"
    make_tiny_encoder(hidden=128, layers=4).save(out)
    return str(out)


def _batches(train: Path, batch: int, steps: int, rank: int = 0, world: int = 1) -> list[tuple[list[str], list[str]]]:
    """The (queries, positives) of global steps 0..steps-1 in Negatron's own data order (seed 0):
    every variant trains on the same rows, so none is timed on shorter texts than another (the
    file's first rows, which the plain loop took before, pad to 4% fewer tokens than random
    batches of the stdlib pairs)."""
    import pyarrow.parquet as pq

    from negatron.trainers.data import RowSchedule

    t = pq.read_table(train, columns=["query", "positive"])
    q, p = t.column("query").to_pylist(), t.column("positive").to_pylist()
    # rank's share of each global batch of ``batch`` rows, as a Ray Train worker of ``world`` gets it
    sched = RowSchedule(t.num_rows, batch // world, rank=rank, world=world, seed=0)
    return [([q[i] for i in r], [p[i] for i in r]) for r in (sched.local_rows(s) for s in range(steps))]


def plain_loop(model_path: str, train: Path, batch: int, seq: int, steps: int, warmup: int, rank: int = 0,
               world: int = 1, sync: str = "none", init: str | None = None) -> float:
    """The simplest correct loop: HF model, mean pooling, in-batch InfoNCE, AdamW. With ``world`` > 1
    it trains only on ``rank``'s share of each global batch and returns that share's samples/s.

    ``sync`` (with ``world`` > 1, a gloo group at ``init``): "none" — the ranks never talk; "barrier"
    — they wait for each other after every backward pass (what synchronous data parallelism costs
    when ranks' batches differ in length, without sending anything); "allreduce" — they average
    their gradients in one flat all-reduce after backward (the plainest DDP, no overlap)."""
    from transformers import AutoModel, AutoTokenizer

    from negatron.trainers.encoder import resolve_model_path

    torch.set_num_threads(1)
    if sync != "none":
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    path = resolve_model_path(model_path)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
    batches = _batches(train, batch, steps + warmup, rank, world)

    def emb(texts):
        b = tok(texts, padding=True, truncation=True, max_length=seq, return_tensors="pt")
        h = model(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    t0 = None
    for s in range(steps + warmup):
        if s == warmup:
            t0 = time.perf_counter()
        q, p = emb(batches[s][0]), emb(batches[s][1])
        loss = torch.nn.functional.cross_entropy(q @ p.T / 0.05, torch.arange(len(q)))
        opt.zero_grad()
        loss.backward()
        if sync == "barrier":
            dist.barrier()
        elif sync == "allreduce":
            from negatron.trainers.distributed import all_reduce_gradients

            all_reduce_gradients(list(model.parameters()))  # one flat buffer, averaged (no overlap)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    rate = steps * (batch // world) / (time.perf_counter() - t0)
    if sync != "none":
        dist.destroy_process_group()
    return rate


def _plain_share(args) -> float:
    return plain_loop(*args)


def plain_side_by_side(model_path: str, train: Path, batch: int, seq: int, steps: int, warmup: int,
                       world: int = 2, sync: str = "none") -> float:
    """The ceiling of any data-parallel run on this machine: ``world`` copies of the plain loop, each
    on its share of every global batch, side by side in separate processes and never talking to each
    other (no gradient exchange, no Ray). Their summed samples/s over the plain loop is the most
    that ``world`` workers can reach here, whatever the communication costs; on a machine with as
    many cores as processes it shows how much the cores share (memory bandwidth, caches, turbo)."""
    import multiprocessing as mp

    init = None
    if sync != "none":
        from negatron.cluster.local import free_port

        init = f"tcp://127.0.0.1:{free_port()}"
    with mp.get_context("spawn").Pool(world) as pool:
        rates = pool.map(_plain_share, [(model_path, train, batch, seq, steps, warmup, r, world, sync, init)
                                        for r in range(world)])
    return sum(rates)


def st_mnrl(model_path: str, train: Path, batch: int, seq: int, steps: int, warmup: int) -> float:
    """sentence-transformers' MultipleNegativesRankingLoss, one optimizer step per batch."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    from negatron.trainers.encoder import resolve_model_path

    torch.set_num_threads(1)
    model = SentenceTransformer(str(resolve_model_path(model_path)), device="cpu")
    model.max_seq_length = seq
    model.train()
    loss_fn = MultipleNegativesRankingLoss(model, scale=20.0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
    batches = _batches(train, batch, steps + warmup)
    t0 = None
    for s in range(steps + warmup):
        if s == warmup:
            t0 = time.perf_counter()
        feats = [model.tokenize(batches[s][0]), model.tokenize(batches[s][1])]
        loss = loss_fn(feats, None)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return steps * batch / (time.perf_counter() - t0)


def negatron_inprocess(model_path: str, train: Path, batch: int, seq: int, steps: int, warmup: int,
                       bank: int) -> float:
    """Negatron's worker loop in this process (world size 1): isolates the bank's cost from Ray's."""
    from negatron.cluster.config import load_config
    from negatron.trainers.loop import run_worker

    cfg = load_config(None, [f"model.path={model_path}", f"data.train={train}", f"trainer.batch_size={batch}",
                             f"model.max_length={seq}", f"trainer.max_steps={steps + warmup}",
                             f"trainer.checkpoint_every={10**6}", f"bank.size={bank}", "trainer.log_every_s=1e9",
                             "optim.lr=2e-5"])
    marks = {}
    orig = torch.optim.AdamW.step

    def timed_step(self, *a, **k):  # time from the end of warm-up to the last optimizer step
        out = orig(self, *a, **k)
        marks["n"] = marks.get("n", 0) + 1
        if marks["n"] == warmup:
            marks["t0"] = time.perf_counter()
        marks["t1"] = time.perf_counter()
        return out

    torch.optim.AdamW.step = timed_step
    try:
        run_worker(cfg, 0, 1, report=lambda m, d: None, log=lambda s: None)
    finally:
        torch.optim.AdamW.step = orig
    return steps * batch / (marks["t1"] - marks["t0"])


def negatron_ray(model_path: str, train: Path, batch: int, seq: int, steps: int, warmup: int, workers: int,
                 tmp: Path, bank: int = 0) -> float:
    """Real Ray Train run; samples/s from Negatron's own per-interval log (start-up excluded)."""
    from negatron.cluster.config import load_config
    from negatron.trainers.train import run_training

    cfg = load_config(None, [f"model.path={model_path}", f"data.train={train}", f"trainer.batch_size={batch // workers}",
                             f"trainer.num_workers={workers}", f"model.max_length={seq}",
                             f"trainer.max_steps={steps + warmup}", f"trainer.checkpoint_every={10**6}",
                             f"bank.size={bank}", "trainer.log_every_s=0.001", "optim.lr=2e-5",
                             f"run.storage_path={tmp / 'runs'}", f"run.name=w{workers}b{bank}",
                             "trainer.cpus_per_worker=0.5"])
    res = run_training(cfg)
    hist = json.loads((res.run_dir / "history.json").read_text())
    # one entry per step; the timed steps are the other variants' (the same rows): after warm-up
    rates = [h["samples_per_s"] for h in hist if "samples_per_s" in h and h["step"] > warmup]
    # harmonic mean: total samples / total time
    return len(rates) / sum(1.0 / r for r in rates)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default", help="'default' (all-MiniLM-L6-v2) or 'tiny'")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32, help="global batch")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--skip", default="", help="variants to leave out, comma-separated: st, inprocess, bank, side, sync")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    import ray

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        train = _data(tmp)
        mp = _model_path(args.model, tmp)
        kw = dict(batch=args.batch, seq=args.seq, steps=args.steps, warmup=args.warmup)
        out = {"model": args.model, "global_batch": args.batch, "seq_len": args.seq, "steps_timed": args.steps}
        out["plain_loop_samples_per_s"] = plain_loop(mp, train, **kw)
        if "side" not in skip:
            out["plain_loop_2proc_side_by_side_samples_per_s"] = plain_side_by_side(mp, train, **kw)
        if "sync" not in skip:  # what synchronous steps cost, then what a plain gradient all-reduce adds
            out["plain_loop_2proc_barrier_samples_per_s"] = plain_side_by_side(mp, train, sync="barrier", **kw)
            out["plain_loop_2proc_allreduce_samples_per_s"] = plain_side_by_side(mp, train, sync="allreduce", **kw)
        if "st" not in skip:
            out["st_mnrl_samples_per_s"] = st_mnrl(mp, train, **kw)
        if "inprocess" not in skip:
            out["negatron_inprocess_samples_per_s"] = negatron_inprocess(mp, train, bank=0, **kw)
            if "bank" not in skip:
                out["negatron_inprocess_bank4096_samples_per_s"] = negatron_inprocess(mp, train, bank=4096, **kw)
        # dashboard on, as in the product: Ray Train's placement-group cleaner needs the state API
        from negatron.cluster.local import init_local  # workers know their own cluster's address
        init_local(num_cpus=4, include_dashboard=True, logging_level="ERROR", log_to_driver=False)
        try:
            rk = dict(steps=args.steps, warmup=args.warmup, tmp=tmp)
            out["negatron_ray_1w_samples_per_s"] = negatron_ray(mp, train, args.batch, args.seq, workers=1, **rk)
            if "bank" not in skip:
                out["negatron_ray_1w_bank4096_samples_per_s"] = negatron_ray(mp, train, args.batch, args.seq,
                                                                            workers=1, bank=4096, **rk)
            out["negatron_ray_2w_samples_per_s"] = negatron_ray(mp, train, args.batch, args.seq, workers=2, **rk)
        finally:
            ray.shutdown()
    p = out["plain_loop_samples_per_s"]

    def ratio(name: str, a: str, b: str, minus_one: bool = False) -> None:
        if a in out and b in out:
            out[name] = out[a] / out[b] - (1 if minus_one else 0)

    ratio("ratio_negatron_1w_vs_plain", "negatron_ray_1w_samples_per_s", "plain_loop_samples_per_s")
    ratio("ratio_negatron_2w_vs_plain", "negatron_ray_2w_samples_per_s", "plain_loop_samples_per_s")
    # the machine's own ceiling for two workers, and how much of it Negatron's 2 workers reach
    ratio("ratio_2proc_side_by_side_vs_plain", "plain_loop_2proc_side_by_side_samples_per_s", "plain_loop_samples_per_s")
    ratio("ratio_negatron_2w_vs_side_by_side", "negatron_ray_2w_samples_per_s",
          "plain_loop_2proc_side_by_side_samples_per_s")
    ratio("ratio_2proc_barrier_vs_plain", "plain_loop_2proc_barrier_samples_per_s", "plain_loop_samples_per_s")
    ratio("ratio_2proc_allreduce_vs_plain", "plain_loop_2proc_allreduce_samples_per_s", "plain_loop_samples_per_s")
    ratio("ratio_negatron_2w_vs_2proc_allreduce", "negatron_ray_2w_samples_per_s",
          "plain_loop_2proc_allreduce_samples_per_s")
    ratio("ratio_negatron_1w_vs_st_mnrl", "negatron_ray_1w_samples_per_s", "st_mnrl_samples_per_s")
    ratio("ratio_st_mnrl_vs_plain", "st_mnrl_samples_per_s", "plain_loop_samples_per_s")
    ratio("bank4096_step_time_overhead_inprocess", "negatron_inprocess_samples_per_s",
          "negatron_inprocess_bank4096_samples_per_s", minus_one=True)
    ratio("bank4096_step_time_overhead_ray", "negatron_ray_1w_samples_per_s", "negatron_ray_1w_bank4096_samples_per_s",
          minus_one=True)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}, indent=2))


if __name__ == "__main__":
    main()
