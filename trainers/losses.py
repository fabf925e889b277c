"""Contrastive losses: pure functions of embeddings and ids (no model calls, no global state).

Shapes: B local queries, N workers, G = N·B global rows, H hard negatives per row, K bank slots,
D embedding dim. ``rank``/``world`` are passed in (as open_clip does), never read from globals.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NEG_INF = float("-inf")


MAX_TEMPERATURE = 10.0  # the config's upper bound on loss.temperature


class Temperature(nn.Module):
    """τ, fixed or learnable. Learnable τ is parametrised as log(1/τ); ``clamp_`` keeps the stored
    parameter in [min_τ, MAX_TEMPERATURE] after each optimizer step (as open_clip does), so the
    gradient never vanishes at the bound and τ can move back from it."""

    def __init__(self, init: float, learnable: bool = False, min_temperature: float = 0.01):
        super().__init__()
        if init <= 0:
            raise ValueError(f"temperature must be > 0, got {init}")
        self.max_log_scale = math.log(1.0 / min_temperature)
        self.min_log_scale = math.log(1.0 / MAX_TEMPERATURE)
        log_scale = torch.tensor(math.log(1.0 / init))
        if learnable:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    def scale(self) -> torch.Tensor:
        """1/τ, a 0-d tensor (with grad when learnable)."""
        return self.log_scale.exp()

    def clamp_(self) -> None:
        """After an optimizer step: a learnable τ back into [min_τ, MAX_TEMPERATURE]."""
        if isinstance(self.log_scale, nn.Parameter):
            with torch.no_grad():
                self.log_scale.clamp_(self.min_log_scale, self.max_log_scale)

    def value(self) -> float:
        return float(1.0 / self.scale().detach())

    def state_part(self) -> dict[str, torch.Tensor]:
        """τ as a checkpoint part (``train_state/extra.safetensors``)."""
        return {"log_scale": self.log_scale.detach().cpu().reshape(1)}

    def load_state_part(self, part: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.log_scale.copy_(part["log_scale"].reshape(()))
        self.clamp_()


def same_id_mask(query_pos_ids: torch.Tensor, cand_ids: torch.Tensor,
                 keep: torch.Tensor | None = None) -> torch.Tensor:
    """B×C bools: True where cand_ids[j] == query_pos_ids[i] (a false negative), except ``keep``.

    query_pos_ids: B, cand_ids: C, keep: B×C bool (the labelled positive).
    """
    same = query_pos_ids[:, None] == cand_ids[None, :]  # B×C
    if keep is not None:
        same &= ~keep  # B×C
    return same


def _masked_ce(logits: torch.Tensor, masked: torch.Tensor, scale: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # Scale first, then mask: -inf·scale would give NaN gradients for a learnable τ.
    return F.cross_entropy((logits * scale).masked_fill(masked, NEG_INF), labels)


def _label_keep(b: int, g: int, labels: torch.Tensor) -> torch.Tensor:
    keep = torch.zeros(b, g, dtype=torch.bool, device=labels.device)  # B×G
    keep[torch.arange(b, device=labels.device), labels] = True
    return keep


def info_nce(
    q: torch.Tensor,
    pos_global: torch.Tensor,
    pos_ids_global: torch.Tensor,
    scale: torch.Tensor,
    rank: int = 0,
    neg_global: torch.Tensor | None = None,
    neg_ids_global: torch.Tensor | None = None,
    neg_valid_global: torch.Tensor | None = None,
    bank_keys: torch.Tensor | None = None,
    bank_ids: torch.Tensor | None = None,
    bank_valid: torch.Tensor | None = None,
    bank_filter_ratio: float = 0.0,
    bank_key_pos: torch.Tensor | None = None,
    bank_weight: float | None = None,
    query_ids_global: torch.Tensor | None = None,
    bank_qids: torch.Tensor | None = None,
    stats: dict | None = None,
    guide_q: torch.Tensor | None = None,
    guide_pos_global: torch.Tensor | None = None,
    guide_neg_global: torch.Tensor | None = None,
    guide_bank: torch.Tensor | None = None,
    guide_margin: float = 0.0,
) -> torch.Tensor:
    """InfoNCE of the local queries against global in-batch candidates (+ hard negatives + bank).

    With ``bank_key_pos`` (MoCo mode) the bank is scored in its own softmax whose positive is the
    key encoder's embedding of the query's positive, so positive and negatives come from the same
    encoder state and the model cannot win by telling fresh embeddings from stale ones; the result
    is the mean of the in-batch term and this bank term. Without it the bank keys join the
    in-batch softmax.

    Args:
        q: B×D local query embeddings (with grad).
        pos_global: G×D positives of all ranks in rank order (with grad: see gather_with_grad).
        pos_ids_global: G item ids of those positives.
        scale: 1/τ (0-d tensor).
        rank: this rank; query i's positive is row rank·B + i of ``pos_global``.
        neg_global, neg_ids_global, neg_valid_global: (G·H)×D hard negatives, their ids, validity.
        bank_keys, bank_ids, bank_valid: K×D keys (no grad), K ids, K validity from the bank.
        bank_key_pos: B×D (no grad) key-encoder embeddings of the local positives (MoCo mode).
        bank_weight: MoCo mode: None → the mean of the in-batch and bank terms; w → in-batch +
            w × bank term (the bank term's relative weight).
        bank_filter_ratio: if > 0, a bank key scoring above ratio × the positive's score is taken
            for an unlabelled duplicate (a likely false negative) and masked, as in NV-Retriever's
            positive-aware filtering.
        query_ids_global: G query-group ids of the in-batch rows (rows of one query share it);
            another positive of the same query is never a negative.
        bank_qids: K query-group ids of the bank's keys (-1 = unknown), masked the same way.
        stats: if given, gets ``bank_masked``: the share of (query, valid bank entry) pairs masked
            as a duplicate or likely false negative, and with a guide ``guide_masked``: the share of
            in-batch negatives the guide masked (0-d tensors on the device: no host sync).
        guide_q, guide_pos_global, guide_neg_global, guide_bank: a frozen guide model's embeddings
            (no grad) of the local queries (B×E), of the candidates in the same rows as
            ``pos_global`` / ``neg_global`` / ``bank_keys``. GISTEmbed (Solatorio, 2024): a
            candidate the guide scores above the guide's score of the query's positive minus
            ``guide_margin`` is taken for a false negative and masked.

    Returns:
        The mean loss over the B local queries (0-d). Candidates sharing the query's positive id,
        or belonging to the same query (``query_ids_global``), are never negatives.
    """
    b = q.shape[0]
    labels = torch.arange(b, device=q.device) + rank * b  # B, column of each positive
    my_ids = pos_ids_global[labels]  # B
    keep = _label_keep(b, pos_global.shape[0], labels)  # B×G
    logits = [q @ pos_global.T]  # B×G
    masks = [same_id_mask(my_ids, pos_ids_global, keep)]  # B×G
    my_qids = None
    if query_ids_global is not None:
        my_qids = query_ids_global[labels]  # B
        masks[0] = masks[0] | same_id_mask(my_qids, query_ids_global, keep)  # B×G
    guide_thr = None
    if guide_q is not None:
        gq = guide_q.detach().float()  # B×E
        guide_thr = (gq * guide_pos_global[labels].float()).sum(-1, keepdim=True) - guide_margin  # B×1
        gm = (gq @ guide_pos_global.float().T > guide_thr) & ~keep  # B×G, never the labelled positive
        if stats is not None:
            stats["guide_masked"] = (gm & ~masks[0]).sum() / max(b * (pos_global.shape[0] - 1), 1)
        masks[0] = masks[0] | gm
    if neg_global is not None and neg_global.shape[0] > 0:
        logits.append(q @ neg_global.T)  # B×(G·H)
        m = same_id_mask(my_ids, neg_ids_global)  # B×(G·H)
        if neg_valid_global is not None:
            m = m | ~neg_valid_global[None, :]  # B×(G·H)
        if guide_thr is not None and guide_neg_global is not None:
            m = m | (gq @ guide_neg_global.float().T > guide_thr)  # B×(G·H)
        masks.append(m)
    bank_term = None
    if bank_keys is not None and bank_keys.shape[0] > 0:
        bank_logits = q @ bank_keys.detach().T  # B×K
        m = same_id_mask(my_ids, bank_ids)  # B×K
        if my_qids is not None and bank_qids is not None:
            m = m | same_id_mask(my_qids, bank_qids)  # B×K, another positive of the same query
        if bank_key_pos is not None:
            pos_logit = (q * bank_key_pos.detach()).sum(-1, keepdim=True)  # B×1
        else:
            pos_logit = logits[0].gather(1, labels[:, None])  # B×1
        if guide_thr is not None and guide_bank is not None:
            m = m | (gq @ guide_bank.float().T > guide_thr)  # B×K
        if bank_filter_ratio > 0:
            ps = pos_logit.detach()  # B×1
            # only where the positive scores > 0, so the ratio keeps its meaning
            m = m | ((bank_logits.detach() > bank_filter_ratio * ps) & (ps > 0))  # B×K
        valid = bank_valid if bank_valid is not None else torch.ones_like(bank_ids, dtype=torch.bool)  # K
        if stats is not None:  # false-negative masking among the entries that count
            stats["bank_masked"] = (m & valid[None, :]).sum() / (valid.sum() * b).clamp(min=1)
        m = m | ~valid[None, :]  # B×K
        if bank_key_pos is not None:
            zeros = torch.zeros(b, dtype=torch.long, device=q.device)  # B, the positive is column 0
            keep = torch.zeros(b, 1, dtype=torch.bool, device=q.device)  # B×1
            bank_term = _masked_ce(torch.cat([pos_logit, bank_logits], dim=1),
                                   torch.cat([keep, m], dim=1), scale, zeros)  # over B×(1+K)
        else:
            logits.append(bank_logits)
            masks.append(m)
    # B×(G + G·H [+ K])
    loss = _masked_ce(torch.cat(logits, dim=1), torch.cat(masks, dim=1), scale, labels)
    if bank_term is None:
        return loss
    return 0.5 * (loss + bank_term) if bank_weight is None else loss + bank_weight * bank_term


def symmetric_term(pos_local: torch.Tensor, q_global: torch.Tensor, pos_ids_global: torch.Tensor,
                   scale: torch.Tensor, rank: int = 0, query_ids_global: torch.Tensor | None = None) -> torch.Tensor:
    """The reverse direction: each local positive against all global queries (mean over B).

    A query whose positive has the same id as this positive, or that is this row's query again
    (same ``query_ids_global``), is not a negative.
    """
    b = pos_local.shape[0]
    labels = torch.arange(b, device=pos_local.device) + rank * b  # B
    keep = _label_keep(b, q_global.shape[0], labels)  # B×G
    logits = pos_local @ q_global.T  # B×G
    masked = same_id_mask(pos_ids_global[labels], pos_ids_global, keep)  # B×G
    if query_ids_global is not None:
        masked = masked | same_id_mask(query_ids_global[labels], query_ids_global, keep)  # B×G
    return _masked_ce(logits, masked, scale, labels)


def contrastive_loss(q: torch.Tensor, pos_global: torch.Tensor, pos_ids_global: torch.Tensor,
                     scale: torch.Tensor, rank: int = 0, symmetric: bool = False,
                     q_global: torch.Tensor | None = None, **negatives) -> torch.Tensor:
    """InfoNCE (q→candidates), averaged with the reverse direction when ``symmetric``."""
    loss = info_nce(q, pos_global, pos_ids_global, scale, rank=rank, **negatives)
    if symmetric:
        if q_global is None:
            raise ValueError("symmetric loss needs q_global (the gathered queries)")
        b = q.shape[0]
        pos_local = pos_global[rank * b:(rank + 1) * b]  # B×D
        loss = 0.5 * (loss + symmetric_term(pos_local, q_global, pos_ids_global, scale, rank,
                                            negatives.get("query_ids_global")))
    return loss
