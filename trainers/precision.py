"""Mixed precision and activation checkpointing of the training step (``trainer.precision``,
``trainer.allow_tf32``, ``model.gradient_checkpointing``).

Only the encoder's transformer runs under autocast (bf16 or fp16): pooling, the projection, the
normalisation, the gathers, the loss, the bank and the momentum update stay in fp32, because every
module with an ``autocast_dtype`` attribute returns fp32 embeddings or logits. fp16 adds a gradient
scaler (its state is checkpointed); bf16 needs none and runs on CPUs too.
"""

from __future__ import annotations

import contextlib

import torch

DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(dtype: torch.dtype | None, device: torch.device):
    """``torch.autocast`` for ``dtype`` on ``device``'s type; a no-op context for fp32 (None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def set_precision(model: torch.nn.Module, precision: str) -> None:
    """Run every encoder inside ``model`` (the trained one, a momentum copy) at ``precision``."""
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {', '.join(DTYPES)}, got {precision!r}")
    for m in model.modules():
        if hasattr(m, "autocast_dtype"):
            m.autocast_dtype = DTYPES[precision]


def setup(model: torch.nn.Module, cfg, device: torch.device):
    """Apply the config's precision, TF32 and gradient checkpointing to a built training model;
    returns the fp16 gradient scaler, or None."""
    set_precision(model, cfg.trainer.precision)
    if device.type == "cuda":  # TF32 matmuls on GPUs that have them (Ampere and later)
        torch.backends.cuda.matmul.allow_tf32 = cfg.trainer.allow_tf32
        torch.backends.cudnn.allow_tf32 = cfg.trainer.allow_tf32
    if cfg.model.gradient_checkpointing:
        model.encoder.enable_gradient_checkpointing()
    if cfg.trainer.precision == "fp16":
        return torch.amp.GradScaler(device.type)
    return None


def enable_checkpointing(hf_model) -> None:
    """transformers' activation checkpointing, non-reentrant (it keeps the RNG state, so dropout
    in the recomputed forward matches the first one)."""
    from negatron.cluster.config import ConfigError

    if not getattr(hf_model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"model.gradient_checkpointing: {type(hf_model).__name__} does not support it")
    kwargs = {"use_reentrant": False}
    if hasattr(hf_model, "activation_checkpointing_enable"):  # the name from transformers 5 on
        hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
