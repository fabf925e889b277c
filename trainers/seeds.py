"""Every random stream of a training run, derived from ``trainer.seed`` in one place.

A run is a function of its seed: the data order, dropout and augmentations all follow from
(seed, epoch) or (seed, step, rank, stream), so a resumed run repeats exactly what an
uninterrupted one would have done, and two workers never share a stream. The four derivations
below are kept bit-for-bit as the first releases made them (published results and existing
checkpoints reproduce); new streams should use ``mix``.
"""

from __future__ import annotations

import random

import numpy as np


def mix(*parts: int) -> int:
    """FNV-1a over integer parts: a 63-bit seed for one (seed, step, rank, stream, ...) stream."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFF)) * 1099511628211) & ((1 << 63) - 1)
    return h


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The data order of one epoch (a permutation of the table's rows), the same on every rank."""
    return np.random.default_rng([seed, epoch])


def block_order_rng(seed: int, epoch: int) -> np.random.Generator:
    """The order of a large table's blocks (row groups) in one epoch (``trainers/ingest.py``)."""
    return np.random.default_rng([seed, epoch, 0x626C6F636B])


def window_rng(seed: int, epoch: int, window: int) -> np.random.Generator:
    """The order of the rows inside one shuffle window of one epoch."""
    return np.random.default_rng([seed, epoch, 0x77696E646F77, window])


def dropout_seed(seed: int, step: int, rank: int) -> int:
    """torch's global seed at each step on each rank (dropout, fresh-head initialisation aside)."""
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**31)


def text_rng(seed: int, step: int, rank: int, stream: int) -> random.Random:
    """The text augmentations of one (step, rank) batch side."""
    return random.Random(f"{seed}:{step}:{rank}:{stream}")


def image_generator(seed: int, step: int, rank: int, stream: int) -> "torch.Generator":
    """The image augmentations of one (step, rank) view."""
    import torch  # here, not at import: the data path (ingest, mining, the index) needs no torch

    return torch.Generator().manual_seed(mix(seed, step, rank, stream))
