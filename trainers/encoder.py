"""Bi-encoder: a Hugging Face transformer + pooling (+ optional projection) (+ L2 normalisation).

``forward`` only runs the model; the contrastive math lives in ``losses``. ``save`` writes a folder
that ``transformers.AutoModel`` and ``sentence_transformers.SentenceTransformer`` load directly
(the sentence-transformers module files sit beside the Hugging Face ones).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

# re-exported: callers that import these from ``encoder`` keep working
from .precision import autocast, enable_checkpointing
from .model_io import (DEFAULT_MODEL, IMAGE_CONFIG, PROMPT_ROLES, ModelLoadError, load_error,  # noqa: F401
                       read_json, read_prompts, read_st_settings, require_safetensors, resolve_model_path,
                       write_st_config)


def load_encoder(path: str):
    """A text ``Encoder`` or an ``ImageEncoder``, whichever the folder holds."""
    folder = resolve_model_path(path)
    if (folder / IMAGE_CONFIG).is_file():
        from .image_encoder import ImageEncoder

        return ImageEncoder.from_pretrained(folder)
    return Encoder.from_pretrained(str(folder))


def plan_chunks(lengths: np.ndarray, max_chunk: int, forward_cost: float) -> list[tuple[int, int]]:
    """Split texts sorted by length (longest first) into forward passes of least total cost.

    A pass over rows ``i..j-1`` pads every row to ``lengths[i]``; its cost is modelled as
    ``forward_cost + (j - i) * lengths[i]`` tokens, where ``forward_cost`` is the fixed cost of one
    forward pass counted in tokens. Dynamic programming over the split points, at most
    ``max_chunk`` rows per pass: a batch of mixed lengths is cut where padding would cost more than
    another pass, and texts of similar length stay together.

    Args:
        lengths: N token counts, non-increasing.
        max_chunk: most rows per pass (>= 1).
        forward_cost: fixed cost of a pass, in tokens (>= 0).

    Returns:
        ``(start, end)`` ranges covering ``0..N`` in order.
    """
    n = len(lengths)
    if n == 0:
        return []
    lengths = np.asarray(lengths, dtype=np.float64)
    best = np.zeros(n + 1)  # best[j]: least cost of rows 0..j-1
    cut = np.zeros(n + 1, dtype=np.int64)
    for j in range(1, n + 1):
        i = np.arange(max(0, j - max_chunk), j)  # candidate starts of the last pass
        cost = best[i] + forward_cost + (j - i) * lengths[i]
        k = int(np.argmin(cost))
        best[j], cut[j] = cost[k], i[k]
    out, j = [], n
    while j > 0:
        out.append((int(cut[j]), j))
        j = int(cut[j])
    return out[::-1]


class TextInput:
    """What every text-encoder backend (torch ``Encoder``, ``OnnxEncoder``) shares on the input
    side: the tokenizer, the token limit, the query/document prompts, and unpadded tokenization
    padded per forward pass. Needs ``tokenizer``, ``max_length`` and ``prompts``."""

    forward_cost_tokens: float = 32.0
    prompts: dict[str, str]
    max_length: int

    def set_prompts(self, query: str | None = None, document: str | None = None) -> None:
        """Set the prompts; None keeps the current one, "" removes it."""
        for role, text in (("query", query), ("document", document)):
            if text is not None:
                if text:
                    self.prompts[role] = text
                else:
                    self.prompts.pop(role, None)

    def prompted(self, texts: Sequence[str], role: str | None) -> Sequence[str]:
        """``texts`` with the role's prompt in front (``role`` None, or no prompt: unchanged)."""
        if role is not None and role not in PROMPT_ROLES:
            raise ValueError(f"role must be one of {PROMPT_ROLES} or None, got {role!r}")
        prompt = self.prompts.get(role or "")
        return [prompt + t for t in texts] if prompt else texts

    def token_lengths(self, texts: Sequence[str], max_length: int | None = None, role: str | None = None) -> np.ndarray:
        """Tokens per text after truncation (N ints), special tokens and the role's prompt included."""
        return _lengths(self._tokenize_unpadded(self.prompted(texts, role), max_length))

    def _tokenize_unpadded(self, texts: Sequence[str], max_length: int | None = None):
        """Token ids (and masks) per text after truncation, not padded: lists of lists."""
        if not len(texts):
            return {"input_ids": []}
        return self.tokenizer(list(texts), truncation=True, max_length=max_length or self.max_length)

    def _pad(self, tok, idx: np.ndarray) -> dict[str, torch.Tensor]:
        """Rows ``idx`` of an unpadded tokenization as b×L tensors, padded as the tokenizer pads."""
        tk = self.tokenizer
        width = max(len(tok["input_ids"][i]) for i in idx)
        fills = {"input_ids": tk.pad_token_id or 0, "attention_mask": 0,
                 "token_type_ids": getattr(tk, "pad_token_type_id", 0)}
        left = tk.padding_side == "left"
        out = {}
        for key, fill in fills.items():
            if key not in tok:
                continue
            arr = np.full((len(idx), width), fill, dtype=np.int64)  # b×L
            for j, i in enumerate(idx):
                seq = tok[key][i]
                if left:
                    arr[j, width - len(seq):] = seq
                else:
                    arr[j, :len(seq)] = seq
            out[key] = torch.from_numpy(arr)
        return out


class Encoder(TextInput, nn.Module):
    """Text bi-encoder.

    Args:
        backbone: a transformers ``PreTrainedModel`` returning ``last_hidden_state``.
        tokenizer: its (fast) tokenizer.
        pooling: "mean" or "cls".
        projection_dim: 0 for none, else a linear head to this size.
        normalize: L2-normalise the output.
        max_length: default truncation length for ``tokenize``.

    ``encode`` sorts texts by token count and splits them with ``plan_chunks``; a forward pass is
    taken to cost as much as ``forward_cost_tokens`` tokens (measured for all-MiniLM-L6-v2 on one
    CPU thread: ~4.4 ms per pass against ~0.17 ms per token).
    """

    autocast_dtype: torch.dtype | None = None  # bf16 / fp16 autocast of the transformer (precision.py)

    def __init__(self, backbone: nn.Module, tokenizer, pooling: str = "mean", projection_dim: int = 0,
                 normalize: bool = True, max_length: int = 128):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = normalize
        self.max_length = max_length
        hidden = backbone.config.hidden_size
        self.projection = nn.Linear(hidden, projection_dim) if projection_dim else None
        # model.query_prompt / model.document_prompt, prepended by role (saved with the model)
        self.prompts: dict[str, str] = {}

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the transformer's activations in backward (model.gradient_checkpointing)."""
        enable_checkpointing(self.backbone)

    @property
    def dim(self) -> int:
        return self.projection.out_features if self.projection is not None else self.backbone.config.hidden_size

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str, pooling: str | None = None, projection_dim: int | None = None,
                        normalize: bool | None = None, max_length: int | None = None) -> "Encoder":
        """Load from a Hugging Face / sentence-transformers / Negatron folder (offline).

        Settings stored in the folder (sentence-transformers module files) are used unless given.
        Raises:
            ModelLoadError: the folder is missing, incomplete or corrupt.
        """
        from transformers import AutoModel, AutoTokenizer

        folder = resolve_model_path(path)
        st = read_st_settings(folder)
        require_safetensors(folder)
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            backbone = AutoModel.from_pretrained(folder, local_files_only=True, use_safetensors=True)
        except Exception as e:  # noqa: BLE001 - transformers/torch raise many types; one line for the user
            raise load_error(folder, "model", e) from None
        proj_dim = st.get("projection_dim", 0) if projection_dim is None else projection_dim
        enc = cls(backbone, tokenizer,
                  pooling=pooling or st.get("pooling", "mean"),
                  projection_dim=proj_dim,
                  normalize=st.get("normalize", True) if normalize is None else normalize,
                  max_length=max_length or st.get("max_length", 128))
        dense = folder / "2_Dense" / "model.safetensors"
        if enc.projection is not None and dense.is_file() and proj_dim == st.get("projection_dim"):
            sd = load_file(str(dense))
            enc.projection.load_state_dict({"weight": sd["linear.weight"], "bias": sd["linear.bias"]})
        enc.prompts = read_prompts(folder)
        return enc

    @classmethod
    def from_config(cls, hf_config, tokenizer, **kwargs) -> "Encoder":
        """A freshly initialised encoder (tests build tiny models this way)."""
        from transformers import AutoModel

        return cls(AutoModel.from_config(hf_config), tokenizer, **kwargs)

    # -- running --------------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        return self.tokenizer(list(texts), padding=True, truncation=True,
                              max_length=max_length or self.max_length, return_tensors="pt")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra) -> torch.Tensor:
        """Token ids (B×L) -> embeddings (B×D)."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in extra:
            inputs["token_type_ids"] = extra["token_type_ids"]
        with autocast(self.autocast_dtype, input_ids.device):  # trainer.precision: the transformer only
            hidden = self.backbone(**inputs).last_hidden_state  # B×L×H
        hidden = hidden.float()  # pooling, projection and normalisation in fp32
        if self.pooling == "cls":
            emb = hidden[:, 0]  # B×H
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # B×L×1
            emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # B×H
        if self.projection is not None:
            emb = self.projection(emb)  # B×D
        if self.normalize:
            emb = F.normalize(emb, dim=-1)  # B×D, unit rows
        return emb

    def encode_batch(self, texts: Sequence[str], max_length: int | None = None, role: str | None = None) -> torch.Tensor:
        """Texts (B) -> embeddings B×D with gradients; ``role`` ("query" / "document") picks the prompt."""
        batch = self.tokenize(self.prompted(texts, role), max_length)
        device = next(self.parameters()).device
        return self(**{k: v.to(device) for k, v in batch.items()})

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64, max_length: int | None = None,
               progress: str | None = None, stats: dict | None = None, role: str | None = None) -> np.ndarray:
        """Embed ``texts`` (N) -> float32 array N×D, in input order.

        ``role`` ("query" / "document") prepends that prompt (``model.query_prompt`` /
        ``model.document_prompt``, saved with the model); None embeds the texts as given.
        Texts are sorted by token count and cut into forward passes of at most ``batch_size`` by
        ``plan_chunks``, so little is padded; ``progress`` names a tqdm bar. ``stats``, when given,
        receives ``tokens`` (real tokens, after truncation), ``slots`` (tokens the forward passes
        computed, padding included) and ``passes``.
        """
        was_training = self.training
        if was_training:  # eval() walks every submodule: skip it when already in eval mode
            self.eval()
        device = next(self.parameters()).device

        def forward(batch: dict[str, torch.Tensor]) -> np.ndarray:
            return self(**{k: v.to(device) for k, v in batch.items()}).float().cpu().numpy()  # b×D

        out = encode_sorted(self, self.prompted(texts, role), batch_size, max_length, forward, progress, stats)
        if was_training:
            self.train()
        return out

    # -- saving ---------------------------------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        """Write a folder loadable by transformers, sentence-transformers and Negatron."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(folder, safe_serialization=True)
        self.tokenizer.save_pretrained(folder)
        hidden = self.backbone.config.hidden_size
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": self.max_length, "do_lower_case": False}, indent=2))
        (folder / "1_Pooling").mkdir(exist_ok=True)
        (folder / "1_Pooling" / "config.json").write_text(json.dumps({
            "word_embedding_dimension": hidden,
            "pooling_mode_cls_token": self.pooling == "cls",
            "pooling_mode_mean_tokens": self.pooling == "mean",
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
        }, indent=2))
        if self.projection is not None:
            d = folder / "2_Dense"
            d.mkdir(exist_ok=True)
            (d / "config.json").write_text(json.dumps({
                "in_features": hidden, "out_features": self.projection.out_features, "bias": True,
                "activation_function": "torch.nn.modules.linear.Identity"}, indent=2))
            save_file({"linear.weight": self.projection.weight.detach().cpu().contiguous(),
                       "linear.bias": self.projection.bias.detach().cpu().contiguous()}, str(d / "model.safetensors"))
            modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
        if self.normalize:
            modules.append({"idx": len(modules), "name": str(len(modules)), "path": f"{len(modules)}_Normalize",
                            "type": "sentence_transformers.models.Normalize"})
            (folder / f"{len(modules) - 1}_Normalize").mkdir(exist_ok=True)
        (folder / "modules.json").write_text(json.dumps(modules, indent=2))
        write_st_config(folder, self.prompts, "cosine" if self.normalize else "dot")
        return folder


def encode_sorted(enc, texts: Sequence[str], batch_size: int, max_length: int | None,
                  forward: Callable[[dict[str, torch.Tensor]], np.ndarray], progress: str | None = None,
                  stats: dict | None = None) -> np.ndarray:
    """The inference loop every text-encoder backend shares (torch, ONNX Runtime).

    ``texts`` are tokenized once, unpadded, sorted by token count and cut into forward passes by
    ``plan_chunks``; each pass pads only its own rows and ``forward`` maps those b×L tensors to
    b×D rows. ``enc`` gives ``_tokenize_unpadded``, ``_pad``, ``dim`` and ``forward_cost_tokens``.
    """
    tok = enc._tokenize_unpadded(texts, max_length)
    lengths = _lengths(tok)  # N
    order = np.argsort(-lengths, kind="stable")
    out = np.zeros((len(texts), enc.dim), dtype=np.float32)
    bar = _progress(len(texts), progress)
    slots = passes = 0
    for start, end in plan_chunks(lengths[order], batch_size, enc.forward_cost_tokens):
        idx = order[start:end]
        out[idx] = forward(enc._pad(tok, idx))  # b×D
        slots += len(idx) * int(lengths[idx].max())
        passes += 1
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    if stats is not None:
        stats.update(tokens=int(lengths.sum()), slots=slots, passes=passes)
    return out


def _lengths(tok) -> np.ndarray:
    ids = tok["input_ids"]
    return np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))


def _progress(total: int, desc: str | None):
    if not desc:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="text", mininterval=2.0, dynamic_ncols=True)

