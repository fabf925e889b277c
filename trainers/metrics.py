"""Retrieval metrics (pure Python/numpy, no Ray): Recall@k, MRR@k, nDCG@k.

Definitions follow trec_eval / ranx:
- Recall@k = |relevant ∩ top-k| / |relevant|
- MRR@k    = 1 / rank of the first relevant document within the top k (0 if none)
- nDCG@k   = DCG@k / IDCG@k with linear gains ``rel / log2(rank + 1)``
Each is averaged over queries that have at least one relevant document. Alignment and uniformity
(Wang & Isola, 2020) describe the embedding space itself: how close positives are, how spread out
everything is.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

METRIC_KEYS = ("recall@1", "recall@10", "recall@100", "mrr@10", "ndcg@10")
GEOMETRY = ("alignment", "uniformity")  # of the embeddings, lower is better for both


def recall_at_k(ranked: Sequence[str], relevant: Mapping[str, float], k: int) -> float:
    if not relevant:
        raise ValueError("recall is undefined for a query without relevant documents")
    hits = sum(1 for d in ranked[:k] if relevant.get(d, 0) > 0)
    return hits / sum(1 for v in relevant.values() if v > 0)


def mrr_at_k(ranked: Sequence[str], relevant: Mapping[str, float], k: int) -> float:
    for i, d in enumerate(ranked[:k]):
        if relevant.get(d, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


def ndcg_at_k(ranked: Sequence[str], relevant: Mapping[str, float], k: int) -> float:
    dcg = sum(relevant.get(d, 0.0) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted((v for v in relevant.values() if v > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def evaluate_run(run: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Average the standard metrics over the queries in ``qrels`` that have a relevant document.

    Args:
        run: query_id -> doc ids ranked best first (a missing query counts as an empty ranking).
        qrels: query_id -> {doc_id: graded relevance}; non-positive grades are not relevant.

    Returns:
        The METRIC_KEYS plus ``num_queries``.
    """
    sums = dict.fromkeys(METRIC_KEYS, 0.0)
    n = 0
    for qid, rel in qrels.items():
        rel = {d: float(s) for d, s in rel.items() if s > 0}
        if not rel:
            continue
        ranked = list(run.get(qid, ()))
        sums["recall@1"] += recall_at_k(ranked, rel, 1)
        sums["recall@10"] += recall_at_k(ranked, rel, 10)
        sums["recall@100"] += recall_at_k(ranked, rel, 100)
        sums["mrr@10"] += mrr_at_k(ranked, rel, 10)
        sums["ndcg@10"] += ndcg_at_k(ranked, rel, 10)
        n += 1
    if n == 0:
        raise ValueError("no query in qrels has a relevant document")
    out = {k: v / n for k, v in sums.items()}
    out["num_queries"] = n
    return out


def alignment(a: np.ndarray, b: np.ndarray, alpha: float = 2.0) -> float:
    """Wang & Isola's alignment: the mean ‖a_i − b_i‖^alpha over positive pairs (rows of ``a`` and
    ``b`` in pairs, L2-normalised embeddings). Lower: positives sit closer together."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"alignment needs two N×D arrays of pairs with N > 0, got {a.shape} and {b.shape}")
    return float((np.linalg.norm(a - b, axis=1) ** alpha).mean())


def uniformity(x: np.ndarray, t: float = 2.0, max_rows: int = 2048, seed: int = 0) -> float:
    """Wang & Isola's uniformity: log E exp(−t‖x_i − x_j‖²) over distinct pairs of rows (a seeded
    sample of ``max_rows`` rows when there are more). Lower: the embeddings spread over the sphere;
    the bound for unit vectors is about −t·2 as the dimension grows."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"uniformity needs an N×D array with N >= 2, got shape {x.shape}")
    if x.shape[0] > max_rows:
        x = x[np.sort(np.random.default_rng(seed).choice(x.shape[0], max_rows, replace=False))]
    sq = (x * x).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)  # N×N squared distances
    iu = np.triu_indices(x.shape[0], k=1)
    v = -t * d2[iu]
    m = v.max()
    return float(m + np.log(np.exp(v - m).mean()))  # log-mean-exp, stable
