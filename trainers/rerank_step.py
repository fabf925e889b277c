"""One cross-encoder (reranker) training step: a listwise contrastive loss.

Each query's group is its positive followed by its hard negatives (the pairs file's ``negatives``
column, e.g. from ``negatron mine``) and ``data.in_batch_negatives`` other queries' positives from
the local batch; a row without hard negatives borrows at least ``IN_BATCH_FALLBACK`` of those. For
the first ``data.hard_negatives_after`` steps groups hold in-batch negatives only: a fresh scoring
head learns the easy pairs first (from hard negatives alone it stayed at chance). The loss is the
cross-entropy of softmax(scores / τ) with the positive at index 0. Workers average gradients, so
N workers × B rows train like 1 × N·B.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cross_encoder import CrossEncoder
from .gradcache import cached_backward, check_finite, chunks, one_pass_backward
from .losses import Temperature

IN_BATCH_FALLBACK = 3  # borrowed negatives for a row that has no hard negatives


def listwise_loss(scores: torch.Tensor, valid: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy with the positive at column 0.

    scores: B×M relevance logits, valid: B×M bool (column 0 always valid), scale: 1/τ.
    """
    logits = (scores * scale).masked_fill(~valid, float("-inf"))  # B×M, masked after scaling
    target = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)  # B
    return F.cross_entropy(logits, target)


def build_groups(batch: dict, in_batch: int = 0, hard: bool = True) -> tuple[list[str], list[str], torch.Tensor]:
    """Flatten a PairStream batch into (queries, texts) pairs laid out as a B×M grid + validity mask.

    Row i's in-batch negatives are the positives of rows i+1, i+2, … (cyclically) with another id.
    """
    queries, positives, ids = batch["query"], batch["positive"], batch["pos_ids"].tolist()
    b = len(queries)
    negs: list[list[str]] = [[] for _ in range(b)]
    if hard and batch.get("negatives"):
        h = len(batch["negatives"]) // b
        valid = batch["neg_valid"].tolist()
        for i in range(b):
            negs[i] = [batch["negatives"][i * h + j] for j in range(h) if valid[i * h + j]]
    for i in range(b):
        want = max(in_batch, 0 if negs[i] else IN_BATCH_FALLBACK)
        others = [positives[(i + k) % b] for k in range(1, b) if ids[(i + k) % b] != ids[i]]
        negs[i] += others[:want]
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
    """The trainer's view of a reranker: the training-model interface of ``ContrastiveModel``
    (loss, after-step update, trainable parameters, training state by part). A reranker has no
    memory bank: ``bank`` is None by declaration (the trainer reports no bank for it)."""

    bank = None

    def queue_checksums(self) -> dict[str, str]:
        """No queues: nothing to checksum."""
        return {}

    def __init__(self, encoder: CrossEncoder, temperature: float = 1.0, learnable_temperature: bool = False,
                 min_temperature: float = 0.01, in_batch_negatives: int = 0, hard_negatives_after: int = 0,
                 mini_batch_size: int = 0):
        super().__init__()
        self.mini_batch_size = mini_batch_size  # > 0: pairs scored with gradients per pass (GradCache)
        self.in_batch_negatives = in_batch_negatives
        self.hard_negatives_after = hard_negatives_after
        self.encoder = encoder
        self.temperature = Temperature(temperature, learnable_temperature, min_temperature)

    @classmethod
    def from_config(cls, encoder: CrossEncoder, cfg) -> "CrossEncoderModel":
        return cls(encoder, cfg.loss.temperature, cfg.loss.learnable_temperature, cfg.loss.min_temperature,
                   cfg.data.in_batch_negatives, cfg.data.hard_negatives_after, cfg.trainer.mini_batch_size)

    def state_parts(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"extra": self.temperature.state_part()}

    def load_state_parts(self, read, where) -> None:
        self.temperature.load_state_part(read("extra"))

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = list(self.encoder.parameters())
        if isinstance(self.temperature.log_scale, nn.Parameter):
            params.append(self.temperature.log_scale)
        return params

    def loss(self, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        q, t, valid = build_groups(batch, self.in_batch_negatives, hard=step >= self.hard_negatives_after)
        b, m = valid.shape
        scores = self.encoder.logits(q, t).view(b, m)  # B×M
        return listwise_loss(scores, valid.to(scores.device), self.temperature.scale()), {}

    def forward_backward(self, batch: dict, step: int, scaler=None,
                         before_last_backward=lambda: None) -> tuple[torch.Tensor, dict]:
        """``loss`` and its backward; with ``mini_batch_size`` the B×M pairs' logits are cached
        (gradcache.py): scored without gradients, the listwise loss's gradient taken once, then
        each chunk of pairs rescored with gradients — the same gradients, one chunk's memory."""
        scale = scaler.scale if scaler is not None else (lambda x: x)
        if not self.mini_batch_size:
            return one_pass_backward(*self.loss(batch, step), step, scale, before_last_backward)
        q, t, valid = build_groups(batch, self.in_batch_negatives, hard=step >= self.hard_negatives_after)
        b, m = valid.shape
        idx = list(range(len(q)))
        parts = {"scores": [lambda c=c: self.encoder.logits([q[i] for i in c], [t[i] for i in c])
                            for c in chunks(idx, self.mini_batch_size)]}
        device = next(self.encoder.parameters()).device

        def loss_fn(out):
            scores = out["scores"].view(b, m)  # B×M
            return listwise_loss(scores, valid.to(device), self.temperature.scale()), {}

        return cached_backward(parts, loss_fn, device, scale, lambda loss: check_finite(loss, step),
                               before_last_backward)

    def after_step(self, state: dict, step: int) -> None:
        return None
