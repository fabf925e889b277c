"""Dev checks over a 200k-document dev corpus during Ray Train training, measured; prints JSON.

    python bench/dev_check.py [--docs 200000] [--only tiny|minilm] [--out FILE]

The dev corpus is ``--docs`` real documents (12-line windows of the standard library's source),
with 1000 judged queries (each window's first line). Three short training runs (`negatron train`,
2 steps with a dev check after each; MiniLM: 1 step and 1 check), each in its own process on a
fresh embedded Ray:

- ``tiny_full_1_worker`` / ``tiny_full_2_workers``: the whole corpus at every check
  (``data.max_dev_docs=0``), 1 worker alone, then 2 workers each embedding half. The encoder is a
  2-layer, 64-wide BERT with the packaged tokenizer (MiniLM embeds ~20 such docs/s per core here:
  200k docs would be ~1.5 h per check), so the times are the pipeline's, not MiniLM's;
- ``minilm_default_2_workers``: the packaged all-MiniLM-L6-v2 with the default bounded, seeded
  subsample (``data.max_dev_docs`` 20000: the judged docs plus a seeded sample of the rest).

Each reports the time per dev check (``dev_check_s`` from the run's history.json: embedding on
every worker, the gather to rank 0, exact search and metrics), whether the run finished (no
collective timeout; ``trainer.collective_timeout_s`` is left at its default), and the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def write_task(work: Path, docs: int, queries: int = 1000) -> Path:
    """train.parquet (2000 pairs) and dev/ (``docs`` docs, ``queries`` judged queries)."""
    from serve_load import stdlib_windows

    ids, texts = stdlib_windows(docs + 2000)
    heads = [t.splitlines()[0][:200] for t in texts]
    pq.write_table(pa.table({"query": heads[:2000], "positive": texts[:2000], "query_id": [f"tq{i}" for i in range(2000)],
                             "positive_id": ids[:2000]}), work / "train.parquet")
    dev = work / "dev"
    dev.mkdir()
    ids, texts, heads = ids[2000:], texts[2000:], heads[2000:]
    step = max(1, len(ids) // queries)
    judged = list(range(0, len(ids), step))[:queries]
    pq.write_table(pa.table({"doc_id": ids, "text": texts}), dev / "corpus.parquet", row_group_size=16384)
    pq.write_table(pa.table({"query_id": [f"q{i}" for i in judged], "text": [heads[i] for i in judged]}),
                   dev / "queries.parquet")
    pq.write_table(pa.table({"query_id": [f"q{i}" for i in judged], "doc_id": [ids[i] for i in judged],
                             "score": [1] * len(judged)}), dev / "qrels.parquet")
    return work


def train_run(work: Path, name: str, model: str, workers: int, *extra: str) -> dict:
    from embed_index import run_measured

    args = ["train", f"model.path={model}", f"data.train={work / 'train.parquet'}", f"data.dev={work / 'dev'}",
            f"run.storage_path={work / 'runs'}", f"run.name={name}", f"trainer.num_workers={workers}",
            "trainer.cpus_per_worker=0.5", "trainer.batch_size=8", "trainer.max_steps=2",
            "trainer.checkpoint_every=1", "model.max_length=128", "eval.batch_size=64", "bank.size=0", *extra]
    try:
        r = {**run_measured(args), "rc": 0}
    except RuntimeError as e:  # a failed run (e.g. a collective timeout) is a result, with its output
        r = {"rc": 1, "wall_s": None, "output": str(e)}
    hist_file = work / "runs" / name / "history.json"
    history = json.loads(hist_file.read_text()) if hist_file.is_file() else []
    checks = [h for h in history if "dev_check_s" in h]
    metrics_file = work / "runs" / name / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    out = {"workers": workers, "finished": r["rc"] == 0, "dev_checks": len(checks),
           "dev_check_s": [h["dev_check_s"] for h in checks],
           "dev_docs": metrics.get("num_docs"), "dev_queries": metrics.get("num_queries"),
           "dev_mrr@10": metrics.get("mrr@10"), "process_wall_s": r["wall_s"]}
    if r["rc"] != 0:
        out["tail"] = r["output"][-2000:]
    return out


def main() -> dict:
    from embed_index import emit

    from tests.helpers import make_tiny_encoder

    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=200_000)
    ap.add_argument("--only", choices=["tiny", "minilm"], default=None, help="run one part")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="negatron-dev-check-") as tmp:
        work = write_task(Path(tmp), args.docs)
        make_tiny_encoder(seed=0, hidden=64, layers=2).save(work / "tiny")
        result = {"machine": {"cpus": os.cpu_count()}, "dev_corpus_docs": args.docs}
        if args.only != "minilm":
            result["tiny_full_1_worker"] = train_run(work, "tiny1", str(work / "tiny"), 1, "data.max_dev_docs=0")
            result["tiny_full_2_workers"] = train_run(work, "tiny2", str(work / "tiny"), 2, "data.max_dev_docs=0")
            one, two = result["tiny_full_1_worker"]["dev_check_s"], result["tiny_full_2_workers"]["dev_check_s"]
            if one and two:
                result["speedup_2_vs_1"] = round(min(one) / min(two), 2)
        if args.only != "tiny":  # one dev check: MiniLM embeds ~40 such docs/s on 2 cores
            result["minilm_default_2_workers"] = train_run(work, "minilm", "default", 2, "trainer.max_steps=1")
    if args.only and args.out and Path(args.out).is_file():  # one part again: keep the other's numbers
        result = {**json.loads(Path(args.out).read_text()), **result}
    return emit(result, args.out)


if __name__ == "__main__":
    main()
