"""Self-describing checkpoints.

A checkpoint folder is a Hugging Face / sentence-transformers model folder (safetensors weights,
tokenizer, config) plus:

- ``negatron.json``: format version, run config, step, metrics and the metric history;
- ``train_state/``: ``bank.safetensors`` (keys, ids, write steps, pointer), ``key_encoder.safetensors``
  (momentum encoder), ``extra.safetensors`` (τ), ``optimizer.pt`` (optimizer + LR scheduler,
  loaded with ``weights_only=True``).

Nothing is ever loaded with plain pickle. A missing or corrupt file raises CheckpointError naming it.
Random state needs no file: dropout and augmentation seeds are a function of (seed, step, rank).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from negatron.cluster.errors import NegatronError

FORMAT_VERSION = 1
STATE_DIR = "train_state"


class CheckpointError(NegatronError, ValueError):
    """A checkpoint is missing, truncated, corrupt or not a Negatron checkpoint."""


def read_meta(folder: str | Path) -> dict[str, Any]:
    """``negatron.json`` of a checkpoint folder (a local path or a URI), checked."""
    from negatron.cluster import storage

    path = storage.sub(folder if storage.is_uri(folder) else Path(folder), "negatron.json")
    shown = storage.redact(path)
    if not storage.is_file(path):
        raise CheckpointError(f"{shown}: missing (not a Negatron checkpoint)")
    try:
        meta = json.loads(storage.read_bytes(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{shown}: corrupt JSON ({e})") from None
    if not isinstance(meta, dict) or "step" not in meta or "config" not in meta:
        raise CheckpointError(f"{shown}: not a Negatron checkpoint description (no step/config)")
    if meta.get("format", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{shown}: format {meta['format']} is newer than this Negatron ({FORMAT_VERSION})")
    return meta


def optimizer_checksum(optimizer, scheduler=None) -> str:
    """A digest of the optimizer's state (moments, step counts, LRs) and the scheduler position."""
    h = hashlib.sha256()
    sd = optimizer.state_dict()
    for idx in sorted(sd["state"]):
        for name in sorted(sd["state"][idx]):
            v = sd["state"][idx][name]
            h.update(f"{idx}.{name}".encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes() if torch.is_tensor(v) else repr(v).encode())
    h.update(repr([g["lr"] for g in sd["param_groups"]]).encode())
    if scheduler is not None:
        h.update(repr(scheduler.last_epoch).encode())
    return h.hexdigest()[:16]


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from None


def save_checkpoint(folder: str | Path, model, optimizer, scheduler, step: int, config: dict,
                    metrics: dict, history: list[dict], scaler=None) -> Path:
    """Write the full checkpoint of a training model into ``folder``: the model's encoder, each
    part of its training state (``model.state_parts()``, one safetensors file per part), the
    optimizer and scheduler, and ``negatron.json``."""
    folder = Path(folder)
    model.encoder.save(folder)
    state = folder / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    for name, sd in model.state_parts().items():
        save_file(dedupe_shared({k: v.detach().cpu().contiguous() for k, v in sd.items()}),
                  str(state / f"{name}.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None,
                "scaler": scaler.state_dict() if scaler is not None else None},  # fp16's loss scale
               state / "optimizer.pt")
    meta = {"format": FORMAT_VERSION, "step": step, "config": config, "metrics": metrics, "history": history}
    (folder / "negatron.json").write_text(json.dumps(meta, indent=1))
    return folder


def dedupe_shared(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings): clone them apart."""
    seen: set[int] = set()
    out = {}
    for k, v in sd.items():
        ptr = v.data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def load_training_state(folder: str | Path, model, optimizer, scheduler, scaler=None) -> dict[str, Any]:
    """Restore the model's training state (``model.load_state_parts``: bank, momentum encoder, τ),
    the optimizer and the scheduler into live objects; return meta.

    The encoder weights are loaded by the caller (``Encoder.from_pretrained(folder)``).
    """
    folder = Path(folder)
    meta = read_meta(folder)
    state = folder / STATE_DIR
    model.load_state_parts(lambda name: _load_safetensors(state / f"{name}.safetensors"), state)
    opt_path = state / "optimizer.pt"
    if not opt_path.is_file():
        raise CheckpointError(f"{opt_path}: missing")
    try:
        opt = torch.load(opt_path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise CheckpointError(f"{opt_path}: cannot load optimizer state safely ({type(e).__name__}: {e})") from None
    optimizer.load_state_dict(opt["optimizer"])
    if scheduler is not None and opt.get("scheduler") is not None:
        scheduler.load_state_dict(opt["scheduler"])
    if scaler is not None and opt.get("scaler"):
        scaler.load_state_dict(opt["scaler"])
    return meta
