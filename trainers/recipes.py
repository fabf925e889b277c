"""Workflows built from the trainer's parts: the quickstart (data → zero-shot evaluation →
fine-tuning on Ray Train → evaluation) and its optional reranker stage (mining → a cross-encoder
trained on the mined negatives → two-stage evaluation).

The CLI (`negatron quickstart`) only parses arguments and calls ``quickstart``; tests and benches
call these functions directly.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

from negatron.cluster.config import Config
from negatron.cluster.files import atomic_write, write_json


class StageClock:
    """Wall time of each named stage of a workflow, printed as a table at the end."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.t0 = time.perf_counter()

    @contextmanager
    def stage(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t

    @property
    def total(self) -> float:
        return time.perf_counter() - self.t0

    def table(self) -> str:
        total = self.total
        width = max(len(n) for n in [*self.seconds, "total"])
        lines = [f"  {n:<{width}}  {s / 60:5.1f} min  {100 * s / max(total, 1e-9):3.0f}%" for n, s in self.seconds.items()]
        lines.append(f"  {'total':<{width}}  {total / 60:5.1f} min")
        return "time by stage:\n" + "\n".join(lines)

    def as_dict(self) -> dict:
        return {**{n: round(s, 1) for n, s in self.seconds.items()}, "total": round(self.total, 1)}


def quickstart(cfg: Config, address: str | None = None, with_reranker: bool = False, reranker_steps: int = 300,
               rerank_depth: int = 20, reranker_init: str | None = None) -> dict:
    """The main job. Writes ``zero_shot.json``, ``fine_tuned.json`` and ``quickstart.json`` (both
    metric sets, the training metrics, ``wall_s`` and ``stage_s``, the seconds of each stage) under
    ``run.storage_path``, and prints progress, the before/after table and the time by stage.

    Returns:
        The ``quickstart.json`` summary.
    """
    from .encoder import Encoder
    from .evaluate import evaluate_encoder, format_table
    from .stdlib_data import build_stdlib_dataset
    from .tasks import task_for
    from .train import run_training

    clock = StageClock()
    n = 7 if with_reranker else 4  # stages, for the progress labels
    out = Path(cfg.run.storage_path)
    data_dir = Path(cfg.data.train).parent if cfg.data.train else out / "data"
    with clock.stage("data"):
        if not (data_dir / "train.parquet").is_file():
            print(f"[1/{n}] building the stdlib code-search dataset in {data_dir}", flush=True)
            build_stdlib_dataset(data_dir)
        else:
            print(f"[1/{n}] dataset already in {data_dir}", flush=True)
    cfg = cfg.replace({"data.train": str(data_dir / "train.parquet"), "data.dev": str(data_dir / "dev"),
                       "data.test": str(data_dir / "test")})
    test_dir = cfg.data.test
    qlen = cfg.model.query_max_length or None
    out.mkdir(parents=True, exist_ok=True)
    with clock.stage("zero-shot evaluation"):
        print(f"[2/{n}] zero-shot evaluation of {cfg.model.path} on {test_dir}", flush=True)
        zero_shot = Encoder.from_pretrained(cfg.model.path, max_length=cfg.model.max_length)
        zero_shot.set_prompts(cfg.model.query_prompt or None, cfg.model.document_prompt or None)
        before = evaluate_encoder(zero_shot, test_dir, query_max_length=qlen)
        write_json(out / "zero_shot.json", before)
        print(format_table({"zero-shot": before}), flush=True)
        # the dev check the training run makes, on the starting model: the training plot's step 0
        task = task_for(cfg)
        dev_before = task.evaluate(task.dev_evaluator(cfg), zero_shot, cfg)
        del zero_shot
    with clock.stage("training"):
        print(f"[3/{n}] fine-tuning with {cfg.trainer.num_workers} Ray Train workers, bank size {cfg.bank.size}, "
              f"{cfg.trainer.max_steps} steps", flush=True)
        res = run_training(cfg, address=address)
    with clock.stage("evaluation"):
        print(f"[4/{n}] evaluating the fine-tuned model ({res.final_dir}) on {test_dir}", flush=True)
        after = evaluate_encoder(Encoder.from_pretrained(str(res.final_dir)), test_dir, query_max_length=qlen)
        write_json(out / "fine_tuned.json", after)
    from .train import plot_history, write_cards

    history = json.loads((res.run_dir / "history.json").read_text())
    atomic_write(res.run_dir / "training.png",
                 lambda tmp: plot_history(history, tmp, title=cfg.run.name, zero_shot=dev_before["mrr@10"]))
    write_cards(cfg, res.final_dir, None, res.metrics, None, int(res.metrics.get("steps") or 0), history,
                test=after, plot=res.run_dir / "training.png")  # the final card gains its test scores and step 0
    summary = {"zero_shot": before, "fine_tuned": after, "zero_shot_dev": dev_before, "wall_s": round(clock.total, 1),
               "stage_s": clock.as_dict(), "train": res.metrics, "final_model": str(res.final_dir)}
    write_json(out / "quickstart.json", summary)
    print("\ntest split, before and after fine-tuning:")
    print(format_table({"zero-shot": before, "fine-tuned": after}))
    print(f"\nMRR@10 {before['mrr@10']:.4f} -> {after['mrr@10']:.4f} in {clock.total / 60:.1f} min; "
          f"model in {res.final_dir}, plot in {res.run_dir / 'training.png'}")
    if with_reranker:
        summary["reranker"] = reranker_stage(cfg, Path(res.final_dir), data_dir, out, address=address,
                                             steps=reranker_steps, depth=rerank_depth, init=reranker_init,
                                             clock=clock)
        summary["wall_s"], summary["stage_s"] = round(clock.total, 1), clock.as_dict()
        write_json(out / "quickstart.json", summary)
    print("\n" + clock.table(), flush=True)
    return summary


def reranker_stage(cfg: Config, bi_encoder: Path, data_dir: Path, out: Path, address: str | None = None,
                   steps: int = 300, depth: int = 20, init: str | None = None,
                   clock: StageClock | None = None) -> dict:
    """Mine hard negatives with the fine-tuned bi-encoder, train a cross-encoder on them with Ray
    Train (from ``init``, a cross-encoder folder, or else the fine-tuned bi-encoder with a fresh
    scoring head), rerank the test top ``depth``."""
    from .cross_encoder import RERANK_FILE, CrossEncoder
    from .encoder import Encoder
    from .evaluate import RerankEval, evaluate_two_stage, format_table
    from .mine import mine
    from .train import run_training

    clock = clock or StageClock()
    with clock.stage("mining"):
        print(f"[5/7] mining hard negatives for {data_dir / 'train.parquet'} with {bi_encoder}", flush=True)
        stats = mine(str(bi_encoder), data_dir / "train.parquet", out / "mined.parquet", k=40, skip=3, take=7,
                     max_length=cfg.model.max_length, workers=cfg.trainer.num_workers,
                     cpus_per_worker=cfg.trainer.cpus_per_worker)
        print(f"      {stats['pairs']} pairs, {stats['negatives_per_query_mean']:.1f} negatives each "
              f"({stats['wall_s']:.0f}s)", flush=True)
    ce_cfg = cfg.replace({**reranker_recipe(cfg, bi_encoder, out / "mined.parquet", steps, depth, init),
                          "data.negatives_corpus": stats["negatives_corpus"]})
    with clock.stage("reranker training"):
        print(f"[6/7] training a cross-encoder reranker: {steps} steps, {ce_cfg.trainer.num_workers} Ray Train "
              f"workers, in-batch negatives for {ce_cfg.data.hard_negatives_after} steps, then 1 positive + "
              f"{ce_cfg.data.num_negatives} hard + {ce_cfg.data.in_batch_negatives} in-batch negatives per query",
              flush=True)
        res = run_training(ce_cfg, address=address)
    with clock.stage("two-stage evaluation"):
        reranker = CrossEncoder.from_pretrained(res.final_dir)
        qlen = cfg.model.query_max_length or None
        bi = Encoder.from_pretrained(str(bi_encoder))
        print(f"      choosing the fusion weight on {cfg.data.dev} (top {depth})", flush=True)
        dev = RerankEval(bi, cfg.data.dev, depth=depth, query_max_length=qlen)
        weight, curve = dev.choose_weight(reranker)
        write_json(Path(res.final_dir) / RERANK_FILE,
                   {"rerank_weight": weight, "first_stage": str(bi_encoder), "rerank_depth": depth,
                    "chosen_on": str(cfg.data.dev), "dev_mrr@10_by_weight": curve})
        print(f"[7/7] two-stage evaluation on {cfg.data.test}: bi-encoder top {depth} reranked", flush=True)
        two = evaluate_two_stage(bi, reranker, cfg.data.test, depth=depth, query_max_length=qlen,
                                 weights=(1.0, weight))
    two["rerank_weight"], two["dev_mrr@10_by_weight"] = weight, curve
    write_json(out / "two_stage.json", two)
    print(format_table({"bi-encoder": two["retrieval"], f"+ reranker@{depth}": two["reranked"],
                        f"+ reranker@{depth}, w={weight:g}": two[f"reranked@w={weight:g}"]}))
    print(f"w = fusion weight of the reranker's z-scored logits with the bi-encoder's scores, chosen on dev "
          f"(saved in {Path(res.final_dir) / RERANK_FILE}; `negatron eval --reranker` uses it)")
    print(f"reranker in {res.final_dir}")
    return {"mined": stats, "reranker": str(res.final_dir), **two}


def reranker_recipe(cfg: Config, bi_encoder: Path, mined: Path, steps: int, depth: int,
                    init: str | None = None) -> dict:
    """Overrides that turn the bi-encoder config into the reranker's (measured on the stdlib data:
    from hard negatives alone a fresh head stays at chance; a fast head and in-batch negatives first
    get it learning within ~50 steps)."""
    return {
        "model.kind": "cross-encoder", "model.path": init or str(bi_encoder), "model.max_length": 128,
        "data.train": str(mined), "data.num_negatives": 2, "data.in_batch_negatives": 1,
        "data.hard_negatives_after": steps // 5, "bank.size": 0, "bank.momentum": 0.0,
        "augment.mask_prob": 0.0, "augment.delete_prob": 0.0, "augment.crop": False, "augment.dropout_views": False,
        "trainer.batch_size": 4, "trainer.max_steps": steps, "trainer.checkpoint_every": steps,
        "optim.lr": 1e-4, "optim.head_lr": 0.0 if init else 2e-3, "optim.warmup_steps": max(1, steps // 10),
        "loss.temperature": 1.0, "loss.learnable_temperature": False, "eval.first_stage": str(bi_encoder),
        "eval.rerank_depth": depth, "data.max_dev_queries": 100, "run.name": f"{cfg.run.name}-reranker"}
