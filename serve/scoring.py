"""Scores of a reranked search: the reranker's probabilities, or its logits fused with the
retrieval scores (the fusion ``negatron eval --rerank-weight`` measures)."""

import numpy as np

def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Probabilities from logits (float64; no overflow warning at large |logit|)."""
    z = np.asarray(logits, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -z))


def rerank_order(retrieval: list[float], logits: np.ndarray, weight: float, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """(the scores results are sorted by, the top_k candidate order) for a reranked search.

    weight 1: the reranker's probabilities (ordered by its logits, which keep apart candidates
    whose probabilities round to the same float). Below 1: the reranker's logits and the retrieval
    scores, each z-scored over the candidates, mixed as weight : 1 - weight — the fusion
    ``negatron eval --rerank-weight`` measures.
    """
    from negatron.trainers.evaluate import fuse_scores

    logits = np.asarray(logits, dtype=np.float64)
    if weight >= 1.0:
        return sigmoid(logits), np.argsort(-logits, kind="stable")[:top_k]
    final = fuse_scores(np.asarray(retrieval, dtype=np.float64), logits, weight)
    return final, np.argsort(-final, kind="stable")[:top_k]
