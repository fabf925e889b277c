"""One cross-encoder (reranker) training step: a listwise contrastive loss.

Each query's group is its positive followed by its hard negatives (the pairs file's ``negatives``
column, e.g. from ``negatron mine``); a row without hard negatives borrows other queries'
positives from the local batch. The loss is the cross-entropy of softmax(scores / τ) with the
positive at index 0. Workers average gradients, so N workers × B rows train like 1 × N·B.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cross_encoder import CrossEncoder
from .losses import Temperature

IN_BATCH_FALLBACK = 3  # borrowed negatives for a row that has no hard negatives


def listwise_loss(scores: torch.Tensor, valid: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy with the positive at column 0.

    scores: B×M relevance logits, valid: B×M bool (column 0 always valid), scale: 1/τ.
    """
    logits = (scores * scale).masked_fill(~valid, float("-inf"))  # B×M, masked after scaling
    target = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)  # B
    return F.cross_entropy(logits, target)


def build_groups(batch: dict) -> tuple[list[str], list[str], torch.Tensor]:
    """Flatten a PairStream batch into (queries, texts) pairs laid out as a B×M grid + validity mask."""
    queries, positives, ids = batch["query"], batch["positive"], batch["pos_ids"].tolist()
    b = len(queries)
    negs: list[list[str]] = [[] for _ in range(b)]
    if batch.get("negatives"):
        h = len(batch["negatives"]) // b
        valid = batch["neg_valid"].tolist()
        for i in range(b):
            negs[i] = [batch["negatives"][i * h + j] for j in range(h) if valid[i * h + j]]
    for i in range(b):
        if not negs[i]:
            negs[i] = [positives[j] for j in range(b) if ids[j] != ids[i]][:IN_BATCH_FALLBACK]
    m = 1 + max(len(n) for n in negs)
    q_flat, t_flat, mask = [], [], torch.zeros(b, m, dtype=torch.bool)
    for i in range(b):
        group = [positives[i]] + negs[i]
        mask[i, : len(group)] = True
        group += [positives[i]] * (m - len(group))  # padding, masked out (keeps the grid rectangular)
        q_flat += [queries[i]] * m
        t_flat += group
    return q_flat, t_flat, mask


class CrossEncoderModel(nn.Module):
    """The trainer's view of a reranker: same interface as ContrastiveModel (no bank)."""

    def __init__(self, encoder: CrossEncoder, temperature: float = 1.0, learnable_temperature: bool = False,
                 min_temperature: float = 0.01):
        super().__init__()
        self.encoder = encoder
        self.temperature = Temperature(temperature, learnable_temperature, min_temperature)
        self.bank = None
        self.key_encoder = None

    @classmethod
    def from_config(cls, encoder: CrossEncoder, cfg) -> "CrossEncoderModel":
        return cls(encoder, cfg.loss.temperature, cfg.loss.learnable_temperature, cfg.loss.min_temperature)

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = list(self.encoder.parameters())
        if isinstance(self.temperature.log_scale, nn.Parameter):
            params.append(self.temperature.log_scale)
        return params

    def loss(self, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        q, t, valid = build_groups(batch)
        b, m = valid.shape
        scores = self.encoder.logits(q, t).view(b, m)  # B×M
        return listwise_loss(scores, valid.to(scores.device), self.temperature.scale()), {}

    def after_step(self, state: dict, step: int) -> None:
        return None
