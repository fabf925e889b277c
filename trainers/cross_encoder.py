"""Cross-encoder (reranker): a sequence-classification transformer scoring (query, text) pairs.

Scores follow ``sentence_transformers.CrossEncoder.predict``: one label -> sigmoid of the logit;
two labels -> softmax probability of label 1. Rank order is that of the raw logit either way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .precision import autocast, enable_checkpointing
from .model_io import FINAL, ModelLoadError, in_run_folder, load_error, local_model_folder, read_json, require_safetensors

RERANK_FILE = "negatron_rerank.json"  # in a reranker folder: the fusion weight chosen on dev


def saved_rerank_weight(reranker: str | Path) -> float | None:
    """The fusion weight stored with a reranker (``negatron quickstart --with-reranker`` chooses it
    on dev), or None.

    Raises:
        ValueError: the file exists but holds no weight in [0, 1].
    """
    import json

    try:
        folder = local_model_folder(reranker)  # a URI: the fetched model folder
    except ModelLoadError:
        return None  # the loader names what is wrong with the folder
    for f in (folder / RERANK_FILE, folder / FINAL / RERANK_FILE):
        if f.is_file():
            try:
                w = float(json.loads(f.read_text())["rerank_weight"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{f}: unreadable rerank_weight ({type(e).__name__}: {e})") from None
            if not 0.0 <= w <= 1.0:
                raise ValueError(f"{f}: rerank_weight must be in [0, 1], got {w}")
            return w
    return None


class CrossEncoder(nn.Module):
    """Args:
        model: a transformers ``AutoModelForSequenceClassification`` with 1 or 2 labels.
        tokenizer: its tokenizer (pairs are encoded as text pairs).
        max_length: truncation length of a query+text pair.
    """

    autocast_dtype: torch.dtype | None = None  # bf16 / fp16 autocast (precision.py)

    def __init__(self, model: nn.Module, tokenizer, max_length: int = 256):
        super().__init__()
        labels = model.config.num_labels
        if labels not in (1, 2):
            raise ModelLoadError(f"a cross-encoder needs 1 or 2 labels, this model has {labels}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the transformer's activations in backward (model.gradient_checkpointing)."""
        enable_checkpointing(self.model)

    @classmethod
    def from_pretrained(cls, path: str | Path, max_length: int | None = None) -> "CrossEncoder":
        """Load a Hugging Face / sentence-transformers cross-encoder folder (offline).

        Raises:
            ModelLoadError: the folder is missing, is not a sequence-classification model, or is corrupt.
        """
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder = in_run_folder(local_model_folder(path), "config.json")
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"reranker folder not found or not a Hugging Face model (no config.json): {folder}")
        cfg = read_json(folder / "config.json") or {}
        archs = cfg.get("architectures") or []
        if archs and not any("SequenceClassification" in a for a in archs):
            raise ModelLoadError(f"{folder}: not a cross-encoder (architectures {archs}; "
                                 "expected a *ForSequenceClassification model)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            require_safetensors(folder, "reranker")
            model = AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True,
                                                                       use_safetensors=True)
        except ModelLoadError:
            raise
        except Exception as e:  # noqa: BLE001 - transformers/torch raise many types; one line for the user
            raise load_error(folder, "reranker", e) from None
        st = read_json(folder / "sentence_bert_config.json") or {}
        default_len = int(st.get("max_seq_length") or min(getattr(tokenizer, "model_max_length", 512) or 512, 512))
        return cls(model, tokenizer, max_length=max_length or default_len)

    @classmethod
    def for_training(cls, path: str, max_length: int = 256) -> "CrossEncoder":
        """A cross-encoder to fine-tune: a sequence-classification folder, or any encoder folder
        (e.g. 'default', a bi-encoder checkpoint) given a fresh 1-label head.

        Raises:
            ModelLoadError: the folder is missing or unreadable.
        """
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from .model_io import resolve_model_path

        folder = resolve_model_path(path)
        cfg = read_json(folder / "config.json") or {}
        if any("SequenceClassification" in a for a in cfg.get("architectures") or []):
            return cls.from_pretrained(folder, max_length=max_length)
        require_safetensors(folder)
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, local_files_only=True,
                                                                       use_safetensors=True)
        except Exception as e:  # noqa: BLE001 - transformers/torch raise many types; one line for the user
            raise load_error(folder, "model as a cross-encoder", e) from None
        return cls(model, tokenizer, max_length=max_length)

    def save(self, folder: str | Path) -> Path:
        """A folder that transformers and ``sentence_transformers.CrossEncoder`` load directly."""
        import json

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(folder, safe_serialization=True)
        self.tokenizer.save_pretrained(folder)
        (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": self.max_length}, indent=2))
        return folder

    def logits(self, queries: Sequence[str], texts: Sequence[str], max_length: int | None = None) -> torch.Tensor:
        """Pairs (N) -> relevance logits (N); differentiable (training uses this)."""
        batch = self.tokenizer(list(queries), list(texts), padding=True, truncation=True,
                               max_length=max_length or self.max_length, return_tensors="pt")
        device = next(self.parameters()).device
        with autocast(self.autocast_dtype, device):  # trainer.precision
            out = self.model(**{k: v.to(device) for k, v in batch.items()}).logits  # N×labels
        out = out.float()
        return out[:, 0] if out.shape[1] == 1 else out[:, 1] - out[:, 0]  # N

    @torch.no_grad()
    def score(self, queries: Sequence[str], texts: Sequence[str], chunk_size: int = 32,
              max_length: int | None = None, raw: bool = False) -> np.ndarray:
        """Scores in (0, 1) for N pairs (raw logits with ``raw``), in input order; pairs run in
        length-sorted chunks."""
        was_training = self.training
        self.eval()
        out = score_sorted(queries, texts, chunk_size, raw,
                           lambda q, t: self.logits(q, t, max_length).float().cpu().numpy())
        self.train(was_training)
        return out


def score_sorted(queries: Sequence[str], texts: Sequence[str], chunk_size: int, raw: bool,
                 logits: Callable[[list[str], list[str]], np.ndarray]) -> np.ndarray:
    """The scoring loop every cross-encoder backend shares (torch, ONNX Runtime): pairs sorted by
    length, ``logits`` per chunk of at most ``chunk_size``; probabilities (sigmoid; with 2 labels
    sigmoid(l1 - l0) = softmax[1]) or raw logits, in input order."""
    if len(queries) != len(texts):
        raise ValueError(f"{len(queries)} queries but {len(texts)} texts")
    order = np.argsort([-(len(q) + len(t)) for q, t in zip(queries, texts)], kind="stable")
    out = np.zeros(len(texts), dtype=np.float32)
    for start in range(0, len(texts), chunk_size):
        idx = order[start:start + chunk_size]
        logit = np.asarray(logits([queries[i] for i in idx], [texts[i] for i in idx]), dtype=np.float32)  # b
        out[idx] = logit if raw else 1.0 / (1.0 + np.exp(-logit))
    return out
