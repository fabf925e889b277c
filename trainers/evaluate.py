"""Retrieval evaluation: embed corpus and queries, exact faiss inner-product search, metrics."""

from __future__ import annotations

import time
from typing import Sequence

import faiss
import numpy as np

from .metrics import METRIC_KEYS, evaluate_run
from .schema import EvalData, check_eval_dir


def exact_search(corpus_emb: np.ndarray, query_emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k: (scores Q×k, indices Q×k). Embeddings are float32 rows."""
    if corpus_emb.ndim != 2 or query_emb.ndim != 2 or corpus_emb.shape[1] != query_emb.shape[1]:
        raise ValueError(f"embedding shapes do not match: corpus {corpus_emb.shape}, queries {query_emb.shape}")
    index = faiss.IndexFlatIP(corpus_emb.shape[1])
    index.add(np.ascontiguousarray(corpus_emb, dtype=np.float32))
    k = min(k, corpus_emb.shape[0])
    return index.search(np.ascontiguousarray(query_emb, dtype=np.float32), k)


def _subset(data: EvalData, max_queries: int, max_docs: int):
    """(qids, query texts, doc ids, doc texts, qrels) with the dev-check subsampling applied."""
    qrels = data.relevant()
    qids = [str(q) for q in data.queries.column("query_id").to_pylist()]
    qtexts = data.queries.column("text").to_pylist()
    keep = [i for i, q in enumerate(qids) if q in qrels]
    if max_queries:
        keep = keep[:max_queries]
    qids = [qids[i] for i in keep]
    qtexts = [qtexts[i] for i in keep]
    doc_ids = [str(d) for d in data.corpus.column("doc_id").to_pylist()]
    docs = data.corpus.column("text").to_pylist()
    if max_docs and len(docs) > max_docs:
        judged = {d for q in qids for d in qrels[q]}
        room = max(0, max_docs - len(judged))
        keep_docs = [i for i, d in enumerate(doc_ids) if d in judged or (room := room - 1) >= 0]
        doc_ids = [doc_ids[i] for i in keep_docs]
        docs = [docs[i] for i in keep_docs]
    return qids, qtexts, doc_ids, docs, {q: qrels[q] for q in qids}


def _retrieve(encoder, qtexts, docs, batch_size, top_k, query_max_length, progress):
    t0 = time.perf_counter()
    doc_emb = encoder.encode(docs, batch_size=batch_size, progress="corpus" if progress else None)
    t1 = time.perf_counter()
    q_emb = encoder.encode(qtexts, batch_size=batch_size, max_length=query_max_length,
                           progress="queries" if progress else None)
    t2 = time.perf_counter()
    _, idx = exact_search(doc_emb, q_emb, top_k)
    t3 = time.perf_counter()
    return idx, {"encode_corpus_s": round(t1 - t0, 3), "encode_queries_s": round(t2 - t1, 3),
                 "search_s": round(t3 - t2, 4)}


def evaluate_encoder(encoder, data: EvalData | str, batch_size: int = 64, top_k: int = 100,
                     max_queries: int = 0, query_max_length: int | None = None,
                     progress: bool = True, max_docs: int = 0) -> dict[str, float]:
    """Recall@1/10/100, MRR@10, nDCG@10 of ``encoder`` on an eval folder (or loaded EvalData).

    ``max_queries``/``max_docs`` (0 = all) subsample for quick dev checks during training: the
    first queries are kept, and the corpus keeps every judged document of those queries plus the
    first other documents up to ``max_docs``.

    Returns the METRIC_KEYS plus ``num_queries``, ``num_docs`` and timings in seconds.
    """
    if isinstance(data, str):
        data = check_eval_dir(data)
    qids, qtexts, doc_ids, docs, qrels = _subset(data, max_queries, max_docs)
    idx, timing = _retrieve(encoder, qtexts, docs, batch_size, top_k, query_max_length, progress)
    run = {q: [doc_ids[j] for j in row if j >= 0] for q, row in zip(qids, idx)}
    metrics = evaluate_run(run, qrels)
    metrics.update({"num_docs": len(docs), **timing})
    return metrics


class RerankEval:
    """Second-stage evaluation: a first-stage bi-encoder's top ``depth`` per query, computed once,
    reranked by any cross-encoder passed to :meth:`evaluate` (dev checks during reranker training).
    """

    def __init__(self, first_stage, data: EvalData | str, depth: int = 50, batch_size: int = 64,
                 max_queries: int = 0, max_docs: int = 0, query_max_length: int | None = None,
                 progress: bool = False):
        if isinstance(data, str):
            data = check_eval_dir(data)
        self.qids, self.qtexts, self.doc_ids, self.docs, self.qrels = _subset(data, max_queries, max_docs)
        idx, self.timing = _retrieve(first_stage, self.qtexts, self.docs, batch_size, max(depth, 100),
                                     query_max_length, progress)
        self.first_run = {q: [self.doc_ids[j] for j in row if j >= 0] for q, row in zip(self.qids, idx)}
        self.candidates = [[int(j) for j in row[:depth] if j >= 0] for row in idx]
        self.depth = depth

    def first_stage_metrics(self) -> dict[str, float]:
        return {**evaluate_run(self.first_run, self.qrels), "num_docs": len(self.docs), **self.timing}

    def evaluate(self, reranker, chunk_size: int = 32) -> dict[str, float]:
        """Metrics after reordering each query's top ``depth`` by ``reranker.score``; the rest keep
        their first-stage order below them (so Recall@100 compares like for like)."""
        t0 = time.perf_counter()
        pairs_q = [self.qtexts[i] for i, c in enumerate(self.candidates) for _ in c]
        pairs_d = [self.docs[j] for c in self.candidates for j in c]
        scores = reranker.score(pairs_q, pairs_d, chunk_size=chunk_size) if pairs_q else np.zeros(0)
        run, start = {}, 0
        for q, cand in zip(self.qids, self.candidates):
            s = scores[start:start + len(cand)]
            start += len(cand)
            top = [self.doc_ids[cand[i]] for i in np.argsort(-s, kind="stable")]
            run[q] = top + [d for d in self.first_run[q] if d not in set(top)]
        m = evaluate_run(run, self.qrels)
        m.update({"num_docs": len(self.docs), "rerank_depth": self.depth, "rerank_s": round(time.perf_counter() - t0, 3)})
        return m


def evaluate_two_stage(encoder, reranker, data: EvalData | str, depth: int = 50, batch_size: int = 64,
                       query_max_length: int | None = None, progress: bool = True) -> dict[str, dict]:
    """Bi-encoder retrieval, then cross-encoder reranking of the top ``depth``: both metric sets."""
    ev = RerankEval(encoder, data, depth=depth, batch_size=batch_size, query_max_length=query_max_length,
                    progress=progress)
    return {"retrieval": ev.first_stage_metrics(), "reranked": ev.evaluate(reranker)}


def format_table(rows: dict[str, dict[str, float]], keys: Sequence[str] = METRIC_KEYS) -> str:
    """A small text table: one row per named metrics dict."""
    name_w = max(8, *(len(n) for n in rows))
    head = f"{'model':<{name_w}}  " + "  ".join(f"{k:>10}" for k in keys)
    lines = [head, "-" * len(head)]
    for name, m in rows.items():
        lines.append(f"{name:<{name_w}}  " + "  ".join(f"{m.get(k, float('nan')):>10.4f}" for k in keys))
    return "\n".join(lines)
