"""Hard-negative mining: embed a pairs file's queries and positives with a bi-encoder, search a
faiss index over the positives (or a separate corpus), and keep, for every query, candidates from
a rank window that are neither its positive nor anything sharing the positive's id.

``select_negatives`` is the pure part (unit-tested); ``mine`` embeds in parallel on Ray with
one actor per worker (the model loads once per actor) and shows progress.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .schema import CORPUS, check_pairs, check_table


def select_negatives(pos_ids: Sequence[str], pos_scores: np.ndarray, cand_rows: np.ndarray, cand_scores: np.ndarray,
                     doc_ids: Sequence[str], skip: int, take: int, margin: float | None,
                     doc_texts: Sequence[str] | None = None, pos_texts: Sequence[str] | None = None,
                     query_positive_ids: Sequence[set[str]] | None = None) -> list[list[int]]:
    """Per query, the corpus rows to use as hard negatives.

    Args:
        pos_ids: the positive's id per query (Q).
        pos_scores: the query–positive score per query (Q).
        cand_rows / cand_scores: faiss results, best first (Q×K; row -1 = none).
        doc_ids: corpus ids (a row's id).
        skip: drop the first ``skip`` candidates that are not the positive (likely unlabelled positives).
        take: then keep at most ``take``.
        margin: if set, drop a candidate scoring above ``positive score - margin``.
        doc_texts / pos_texts: when given, a candidate whose text equals the positive's is dropped too.
        query_positive_ids: per query, the ids of every positive of that query (all rows sharing its
            query_id): none of them is ever a negative.
    """
    out: list[list[int]] = []
    for q, pid in enumerate(pos_ids):
        eligible = []
        others = query_positive_ids[q] if query_positive_ids is not None else ()
        for row, score in zip(cand_rows[q], cand_scores[q]):
            if row < 0 or doc_ids[row] == pid or doc_ids[row] in others:  # never a positive of this query
                continue
            if doc_texts is not None and pos_texts is not None and doc_texts[row] == pos_texts[q]:
                continue
            eligible.append((int(row), float(score)))
        window = eligible[skip:]
        if margin is not None:
            window = [(r, s) for r, s in window if s <= pos_scores[q] - margin]
        out.append([r for r, _ in window[:take]])
    return out


def _embed_parallel(model: str, texts: list[str], max_length: int, workers: int, cpus: float, batch: int,
                    desc: str, chunk: int = 256) -> np.ndarray:
    """Embed with ``workers`` Ray actors (each loads the model once), progress as chunks finish."""
    import ray
    from tqdm.auto import tqdm

    @ray.remote(num_cpus=cpus)
    class _Embedder:
        def __init__(self, path: str, threads: int):
            import torch

            from negatron.trainers.encoder import Encoder

            torch.set_num_threads(threads)
            self.enc = Encoder.from_pretrained(path)

        def embed(self, part: list[str]) -> np.ndarray:
            return self.enc.encode(part, batch, max_length)

    actors = [_Embedder.remote(model, max(1, int(cpus))) for _ in range(workers)]
    parts = [texts[i:i + chunk] for i in range(0, len(texts), chunk)]
    futures = {actors[i % workers].embed.remote(p): i for i, p in enumerate(parts)}
    results: dict[int, np.ndarray] = {}
    bar = tqdm(total=len(texts), desc=desc, unit="text", mininterval=2.0, file=sys.stdout)
    pending = list(futures)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        for ref in done:
            i = futures[ref]
            results[i] = ray.get(ref)
            bar.update(len(parts[i]))
    bar.close()
    for a in actors:
        ray.kill(a)
    return np.concatenate([results[i] for i in range(len(parts))]) if parts else np.zeros((0, 1), np.float32)


def mine(model: str, data: str | Path, out: str | Path, k: int = 50, skip: int = 3, take: int = 30,
         margin: float | None = None, corpus: str | Path | None = None, max_length: int = 128,
         workers: int = 2, cpus_per_worker: float = 1.0, batch_size: int = 64,
         embed: Callable[[list[str], str], np.ndarray] | None = None, log=print) -> dict:
    """Write ``out``: the pairs of ``data`` plus ``negatives`` / ``negative_ids`` list columns.

    The candidate pool is ``corpus`` (doc_id, text) if given, else the distinct positives of ``data``.
    ``embed(texts, desc)`` replaces the Ray embedding (tests of the pure path use it).
    Returns counts and timings.
    """
    import faiss

    from .model_io import resolve_model_path

    from negatron.cluster import storage
    from negatron.cluster.config import ConfigError
    from negatron.cluster.files import same_file

    if take < 1 or skip < 0 or k < 1:
        raise ConfigError(f"mine: need --k >= 1, --skip >= 0, --take >= 1 (got k={k}, skip={skip}, take={take})")
    if str(out) in (str(data), str(corpus)) or same_file(out, data) or (corpus is not None and same_file(out, corpus)):
        raise ConfigError(f"mine: --out {out} is an input of this run; write the mined pairs to a new file")
    if storage.is_dir(out):
        raise ConfigError(f"mine: --out {out} is a folder; give a .parquet file path")
    if k < skip + take:
        log(f"note: k={k} < skip+take={skip + take}: fewer than {take} negatives per query")
    t0 = time.perf_counter()
    table = check_pairs(data)
    model_dir = str(resolve_model_path(model))
    if corpus is not None:
        ct = check_table(corpus, CORPUS)
        doc_ids = [str(x) for x in ct.column("doc_id").to_pylist()]
        doc_texts = ct.column("text").to_pylist()
    else:
        seen: dict[str, str] = {}
        for pid, text in zip(map(str, table.column("positive_id").to_pylist()), table.column("positive").to_pylist()):
            seen.setdefault(pid, text)
        doc_ids, doc_texts = list(seen), list(seen.values())
    queries = table.column("query").to_pylist()
    positives = table.column("positive").to_pylist()
    pos_ids = [str(x) for x in table.column("positive_id").to_pylist()]

    if embed is None:
        from negatron.cluster.local import ensure_ray

        ensure_ray()

        def embed(texts: list[str], desc: str) -> np.ndarray:
            return _embed_parallel(model_dir, texts, max_length, workers, cpus_per_worker, batch_size, desc)

    doc_emb = embed(doc_texts, "embed corpus")  # N×D
    q_emb = embed(queries, "embed queries")  # Q×D
    p_emb = embed(positives, "embed positives")  # Q×D
    index = faiss.IndexFlatIP(doc_emb.shape[1])
    index.add(np.ascontiguousarray(doc_emb, dtype=np.float32))
    scores, rows = index.search(np.ascontiguousarray(q_emb, dtype=np.float32), min(k, len(doc_ids)))  # Q×K
    pos_scores = (q_emb * p_emb).sum(1)  # Q
    by_query: dict[str, set[str]] = {}
    qids = [str(x) for x in table.column("query_id").to_pylist()]
    for qid, pid in zip(qids, pos_ids):
        by_query.setdefault(qid, set()).add(pid)
    picked = select_negatives(pos_ids, pos_scores, rows, scores, doc_ids, skip, take, margin, doc_texts, positives,
                              query_positive_ids=[by_query[q] for q in qids])
    negs = [[doc_texts[r] for r in p] for p in picked]
    neg_ids = [[doc_ids[r] for r in p] for p in picked]
    base = table.drop_columns([c for c in ("negatives", "negative_ids") if c in table.column_names])
    result = base.append_column("negatives", pa.array(negs, type=pa.list_(pa.string())))
    result = result.append_column("negative_ids", pa.array(neg_ids, type=pa.list_(pa.string())))
    storage.write_with(out, lambda tmp: pq.write_table(result, tmp))  # temp file + rename, or one PUT
    counts = [len(p) for p in picked]
    return {"pairs": len(queries), "corpus": len(doc_ids), "negatives_per_query_mean": float(np.mean(counts)) if counts else 0.0,
            "queries_without_negatives": int(sum(c == 0 for c in counts)), "wall_s": round(time.perf_counter() - t0, 1),
            "out": str(out)}
