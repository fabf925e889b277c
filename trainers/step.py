"""One contrastive training step: encode, gather across workers, score, update the bank.

``ContrastiveModel`` owns the encoder, the optional momentum (EMA) key encoder, τ and the memory
bank. ``loss`` runs the model calls and hands embeddings to the pure loss functions; ``after_step``
does the momentum update and enqueues the step's gathered keys. The same code runs in one
process and under N workers; tests check both give the same loss and gradients.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from . import distributed as D
from .augment import TextAugmenter
from .bank import MemoryBank
from .encoder import Encoder
from .gradcache import cached_backward, check_finite, chunks, one_pass_backward
from .losses import Temperature, contrastive_loss


class ContrastiveModel(nn.Module):
    """Args:
        encoder: the bi-encoder being trained.
        temperature, learnable_temperature, min_temperature: τ settings.
        bank_size, bank_momentum, bank_max_age: memory bank (size 0 = none).
        symmetric: add the positive→query direction.
        cross_worker: score against all workers' candidates (else only local ones).
        query_max_length: query-side truncation (0 = encoder default).
        bank_filter_ratio: mask bank keys scoring above this × the positive's score (0 = off).
        bank_weight: moco mode: None averages the in-batch and bank terms; a number w gives
            in-batch + w × bank (the bank term's relative weight).
        bank_mode: "joint" (bank keys join the in-batch softmax) or "moco" (a separate softmax
            whose positive is the key encoder's embedding, consistent with the bank keys).
        mini_batch_size: > 0: ``forward_backward`` runs the cached step (GradCache), encoding at
            most this many texts per pass with gradients; 0: one pass over the batch.
        guide, guide_margin: GISTEmbed — a frozen encoder whose scores mask likely false negatives
            (in-batch, hard and bank candidates; losses.info_nce). With a bank, a second queue holds
            the guide's embeddings of the bank's entries, slot for slot.
    """

    def __init__(self, encoder: Encoder, temperature: float = 0.05, learnable_temperature: bool = False,
                 min_temperature: float = 0.01, bank_size: int = 0, bank_momentum: float = 0.0,
                 bank_max_age: int = 0, symmetric: bool = False, cross_worker: bool = True,
                 query_max_length: int = 0, bank_filter_ratio: float = 0.0, bank_mode: str = "moco",
                 bank_weight: float | None = None, mini_batch_size: int = 0, guide: Encoder | None = None,
                 guide_margin: float = 0.0):
        super().__init__()
        self.mini_batch_size = mini_batch_size
        if bank_mode not in ("joint", "moco"):
            raise ValueError(f"bank_mode must be 'joint' or 'moco', got {bank_mode!r}")
        self.bank_filter_ratio = bank_filter_ratio
        self.bank_mode = bank_mode
        self.bank_weight = bank_weight
        self.encoder = encoder
        self.temperature = Temperature(temperature, learnable_temperature, min_temperature)
        self.bank = MemoryBank(bank_size, encoder.dim, bank_max_age) if bank_size else None
        self.momentum = bank_momentum
        self.key_encoder = None
        if self.bank is not None and bank_momentum > 0:
            self.key_encoder = copy.deepcopy(encoder)
            for p in self.key_encoder.parameters():
                p.requires_grad_(False)
        self.guide, self.guide_margin, self.guide_bank = guide, guide_margin, None
        if guide is not None:
            for p in guide.parameters():
                p.requires_grad_(False)
            guide.eval()
            if self.bank is not None:
                self.guide_bank = MemoryBank(bank_size, guide.dim, bank_max_age)
        self.symmetric = symmetric
        self.cross_worker = cross_worker
        self.query_max_length = query_max_length or None

    @classmethod
    def from_config(cls, encoder: Encoder, cfg, guide: Encoder | None = None) -> "ContrastiveModel":
        return cls(encoder, temperature=cfg.loss.temperature,
                   learnable_temperature=cfg.loss.learnable_temperature,
                   min_temperature=cfg.loss.min_temperature, bank_size=cfg.bank.size,
                   bank_momentum=cfg.bank.momentum, bank_max_age=cfg.bank.max_age,
                   symmetric=cfg.loss.symmetric, cross_worker=cfg.loss.cross_worker_negatives,
                   query_max_length=cfg.model.query_max_length, bank_filter_ratio=cfg.bank.filter_ratio,
                   bank_mode=cfg.bank.mode, bank_weight=cfg.bank.weight,
                   mini_batch_size=cfg.trainer.mini_batch_size, guide=guide, guide_margin=cfg.loss.guide_margin)

    def state_parts(self) -> dict[str, dict[str, torch.Tensor]]:
        """The training state besides the encoder's weights, by part: τ (``extra``), the bank and
        the momentum encoder when the model has them."""
        parts = {"extra": self.temperature.state_part()}
        if self.bank is not None:
            parts["bank"] = dict(self.bank.state_dict())
        if self.key_encoder is not None:
            parts["key_encoder"] = dict(self.key_encoder.state_dict())
        if self.guide_bank is not None:
            parts["guide_bank"] = dict(self.guide_bank.state_dict())
        return parts

    def queue_checksums(self) -> dict[str, str]:
        """The checksum of every queue this model trains with, by metrics key: ``bank_checksum``
        (the bank) and ``guide_bank_checksum`` (a GISTEmbed guide's queue, slot for slot with it)."""
        queues = {"bank_checksum": self.bank, "guide_bank_checksum": self.guide_bank}
        return {k: q.checksum() for k, q in queues.items() if q is not None}

    def load_state_parts(self, read, where) -> None:
        """Restore what ``state_parts`` saved; ``read(name)`` returns a part (CheckpointError if
        missing or corrupt)."""
        from .checkpoint import CheckpointError

        if self.bank is not None:
            sd = read("bank")
            if sd.get("keys") is None or tuple(sd["keys"].shape) != tuple(self.bank.keys.shape):
                got = tuple(sd["keys"].shape) if "keys" in sd else None
                raise CheckpointError(f"{where / 'bank.safetensors'}: bank shape {got} does not match the config "
                                      f"({tuple(self.bank.keys.shape)}); resume with the same bank.size")
            self.bank.load_state_dict(sd)
        if self.key_encoder is not None:
            self.key_encoder.load_state_dict(read("key_encoder"))
        if self.guide_bank is not None:
            sd = read("guide_bank")
            if sd.get("keys") is None or tuple(sd["keys"].shape) != tuple(self.guide_bank.keys.shape):
                raise CheckpointError(f"{where / 'guide_bank.safetensors'}: the guide's bank does not match "
                                      "loss.guide_model and bank.size; resume with the same guide and bank")
            self.guide_bank.load_state_dict(sd)
        self.temperature.load_state_part(read("extra"))

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = list(self.encoder.parameters())
        if isinstance(self.temperature.log_scale, nn.Parameter):
            params.append(self.temperature.log_scale)
        return params

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        return D.gather_with_grad(x) if self.cross_worker else x

    def loss(self, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        """Loss of this worker's slice; returns (loss, state for ``after_step``).

        batch: "query", "positive" (B texts each), "pos_ids" (B), optional "negatives" (B·H texts),
        "neg_ids" (B·H), "neg_valid" (B·H).
        """
        enc, qlen = self.encoder, self.query_max_length
        emb = {"q": enc.encode_batch(batch["query"], qlen, role="query"),  # B×D
               "p": enc.encode_batch(batch["positive"], role="document")}  # B×D
        if batch.get("negatives"):
            emb["n"] = enc.encode_batch(batch["negatives"], role="document")  # (B·H)×D
        return self.loss_from(emb, batch, step)

    def forward_backward(self, batch: dict, step: int, scaler=None,
                         before_last_backward=lambda: None) -> tuple[torch.Tensor, dict]:
        """The loss (detached) and the state for ``after_step``, with the gradients accumulated:
        one pass, or the cached step (``mini_batch_size``; gradcache.py) — the same gradients."""
        scale = scaler.scale if scaler is not None else (lambda x: x)
        if not self.mini_batch_size:
            return one_pass_backward(*self.loss(batch, step), step, scale, before_last_backward)

        m, enc = self.mini_batch_size, self.encoder
        qlen = self.query_max_length
        parts = {"q": [lambda c=c: enc.encode_batch(c, qlen, role="query") for c in chunks(batch["query"], m)],
                 "p": [lambda c=c: enc.encode_batch(c, role="document") for c in chunks(batch["positive"], m)]}
        if batch.get("negatives"):
            parts["n"] = [lambda c=c: enc.encode_batch(c, role="document") for c in chunks(batch["negatives"], m)]
        device = next(enc.parameters()).device
        return cached_backward(parts, lambda emb: self.loss_from(emb, batch, step), device, scale,
                               lambda loss: check_finite(loss, step),
                               before_last_backward)

    def loss_from(self, emb: dict[str, torch.Tensor], batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        """The loss given this worker's embeddings ``q``, ``p`` (B×D) and ``n`` ((B·H)×D) —
        computed by the encoder with gradients, or leaf tensors of a cached step."""
        rank = D.rank() if self.cross_worker else 0
        q, p = emb["q"], emb["p"]
        device = q.device
        pos_ids = batch["pos_ids"].to(device)  # B
        p_all = self._gather(p)  # G×D, grad flows to every rank's slice
        ids_all = D.gather_no_grad(pos_ids) if self.cross_worker else pos_ids  # G
        negatives = {}
        qids = batch.get("query_ids")
        if qids is not None:
            qids = qids.to(device)  # B
            negatives["query_ids_global"] = D.gather_no_grad(qids) if self.cross_worker else qids  # G
        if "n" in emb:
            negatives["neg_global"] = self._gather(emb["n"])  # (G·H)×D
            nid, nvalid = batch["neg_ids"].to(device), batch["neg_valid"].to(device)
            negatives["neg_ids_global"] = D.gather_no_grad(nid) if self.cross_worker else nid
            negatives["neg_valid_global"] = D.gather_no_grad(nvalid) if self.cross_worker else nvalid
        keys_local = None
        if self.bank is not None and self.bank_mode == "moco":
            keys_local = self._keys(batch["positive"]) if self.key_encoder is not None else p.detach()  # B×D
            negatives["bank_key_pos"] = keys_local
            negatives["bank_weight"] = self.bank_weight
        if self.bank is not None:
            negatives["bank_keys"] = self.bank.keys
            negatives["bank_ids"] = self.bank.ids
            negatives["bank_qids"] = self.bank.qids
            negatives["bank_valid"] = self.bank.valid(step)
            negatives["bank_filter_ratio"] = self.bank_filter_ratio
        guide_local = None
        if self.guide is not None:
            g = self._guide_embs(batch)  # no grad: q B×E, p B×E, n (B·H)×E
            guide_local = g["p"]
            gather = D.gather_no_grad if self.cross_worker else (lambda x: x)
            negatives.update(guide_q=g["q"], guide_pos_global=gather(g["p"]), guide_margin=self.guide_margin)
            if "n" in g and "neg_global" in negatives:
                negatives["guide_neg_global"] = gather(g["n"])
            if self.guide_bank is not None:
                negatives["guide_bank"] = self.guide_bank.keys
        q_all = self._gather(q) if self.symmetric else None  # G×D
        scale = self.temperature.scale()
        stats: dict = {}
        if self.bank is not None or self.guide is not None:
            negatives["stats"] = stats
        loss = contrastive_loss(q, p_all, ids_all, scale, rank=rank, symmetric=self.symmetric,
                                q_global=q_all, **negatives)
        return loss, {"positives": batch["positive"], "p_all": p_all.detach(), "p_local": p.detach(),
                      "ids_all": ids_all, "ids_local": pos_ids, "qids_local": qids, "keys_local": keys_local,
                      "guide_local": guide_local, **stats}

    @torch.no_grad()
    def prefill_bank(self, texts: list[str], ids: torch.Tensor, batch_size: int = 64) -> int:
        """Fill the bank before the first step with keys of this rank's ``texts`` (ids: N).

        Keys come from the key encoder (or the live encoder, both in eval mode, no gradient); all
        ranks' keys are gathered and enqueued in rank order at step 0, as a training step's are, so
        the bank stays identical everywhere. Every rank must pass the same N. Returns the bank fill.
        """
        if self.bank is None:
            raise ValueError("prefill_bank needs a bank (bank_size > 0)")
        if ids.shape != (len(texts),):
            raise ValueError(f"ids must have shape ({len(texts)},), got {tuple(ids.shape)}")
        enc = self.key_encoder if self.key_encoder is not None else self.encoder
        device = self.bank.keys.device
        keys = torch.from_numpy(enc.encode(texts, batch_size=batch_size, role="document")).to(device)  # N×D
        ids = ids.to(device)
        # always gathered: the bank is shared even when the loss uses only local candidates
        keys, ids = D.gather_no_grad(keys), D.gather_no_grad(ids)  # (world·N)×D, world·N
        self.bank.enqueue(keys, ids, 0)
        if self.guide_bank is not None:  # slot for slot with the bank
            g = torch.from_numpy(self.guide.encode(texts, batch_size=batch_size, role="document")).to(device)
            self.guide_bank.enqueue(D.gather_no_grad(g), ids, 0)
        return self.bank.fill()

    @torch.no_grad()
    def _frozen_encode(self, enc: Encoder, texts: list[str], role: str, max_length: int | None = None) -> torch.Tensor:
        """A frozen encoder's (key encoder, guide) embeddings in eval mode, without gradient, at most
        ``mini_batch_size`` texts per pass in a cached step; the encoder's mode is restored."""
        was = enc.training
        enc.eval()
        size = self.mini_batch_size or len(texts)
        parts = [enc.encode_batch(texts[i:i + size], max_length, role=role) for i in range(0, len(texts), size)]
        enc.train(was)
        return torch.cat(parts) if len(parts) > 1 else parts[0]  # N×D

    def _guide_embs(self, batch: dict) -> dict[str, torch.Tensor]:
        """The guide's embeddings of this worker's queries, positives and hard negatives."""
        out = {"q": self._frozen_encode(self.guide, batch["query"], "query", self.query_max_length),
               "p": self._frozen_encode(self.guide, batch["positive"], "document")}
        if batch.get("negatives"):
            out["n"] = self._frozen_encode(self.guide, batch["negatives"], "document")
        return {k: v.float() for k, v in out.items()}

    def _keys(self, texts: list[str]) -> torch.Tensor:
        return self._frozen_encode(self.key_encoder, texts, "document")  # B×D

    @torch.no_grad()
    def after_step(self, state: dict, step: int) -> None:
        """Momentum update, then enqueue this step's keys of all workers (rank order).

        moco mode enqueues the keys its loss used (from the key encoder before this update, as
        MoCo does); joint mode encodes the positives with the updated key encoder.
        """
        if self.bank is None:
            return
        if self.key_encoder is not None:
            m = self.momentum
            for pk, pq in zip(self.key_encoder.parameters(), self.encoder.parameters()):
                pk.mul_(m).add_(pq.detach(), alpha=1.0 - m)  # EMA: θk ← m·θk + (1−m)·θq
            for bk, bq in zip(self.key_encoder.buffers(), self.encoder.buffers()):
                if bk.is_floating_point():  # running statistics and the like follow by EMA too
                    bk.mul_(m).add_(bq.detach(), alpha=1.0 - m)
                else:  # counters and index buffers (e.g. position_ids) are copied
                    bk.copy_(bq)
        # Every worker enqueues every worker's keys, also when the loss uses only local
        # candidates (cross_worker off): the bank is one shared queue, identical on all ranks.
        if state.get("keys_local") is not None:
            keys = D.gather_no_grad(state["keys_local"])  # G×D
        elif self.key_encoder is not None:
            keys = D.gather_no_grad(self._keys(state["positives"]))  # G×D
        elif self.cross_worker:
            keys = state["p_all"]  # G×D, live encoder, detached (already gathered)
        else:
            keys = D.gather_no_grad(state["p_local"])  # G×D
        ids = state["ids_all"] if self.cross_worker else D.gather_no_grad(state["ids_local"])  # G
        qids = state.get("qids_local")
        qids = D.gather_no_grad(qids) if qids is not None else None  # G
        self.bank.enqueue(keys, ids, step, qids)
        if self.guide_bank is not None:  # the same ids, step and slots as the bank
            self.guide_bank.enqueue(D.gather_no_grad(state["guide_local"]), ids, step, qids)


def augment_batch(batch: dict, aug: TextAugmenter, apply_to: str, dropout_views: bool, seed: int,
                  step: int, rank: int) -> dict:
    """Apply the configured text augmentations to a batch (a new dict)."""
    out = dict(batch)
    if dropout_views:
        out["query"] = list(batch["positive"])
    if aug.active:
        if apply_to in ("query", "both"):
            out["query"] = aug(out["query"], seed, step, rank, stream=0)
        if apply_to in ("positive", "both"):
            out["positive"] = aug(out["positive"], seed, step, rank, stream=1)
    return out
