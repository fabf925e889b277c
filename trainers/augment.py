"""Seeded text augmentations (pure Python, no Ray): the knobs Ray Tune searches.

- span cropping (Contriever): keep a random contiguous span of ``crop_min_ratio``..100% of words
- word deletion: drop each word with ``delete_prob`` (at least one word survives)
- token masking: replace each word with the tokenizer's mask token with ``mask_prob``
- dropout-only views (SimCSE): the query is the positive text itself; dropout makes the views differ

The same (seed, step, rank) gives the same output, so a resumed run repeats its augmentations.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class TextAugmenter:
    mask_prob: float = 0.0
    delete_prob: float = 0.0
    crop: bool = False
    crop_min_ratio: float = 0.5
    mask_token: str = "[MASK]"

    def __post_init__(self):
        for name in ("mask_prob", "delete_prob"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {v}")
        if not 0.0 < self.crop_min_ratio <= 1.0:
            raise ValueError(f"crop_min_ratio must be in (0, 1], got {self.crop_min_ratio}")

    @property
    def active(self) -> bool:
        return self.crop or self.mask_prob > 0 or self.delete_prob > 0

    def one(self, text: str, rng: random.Random) -> str:
        words = text.split(" ")
        if self.crop and len(words) > 1:
            n = max(1, int(round(len(words) * rng.uniform(self.crop_min_ratio, 1.0))))
            start = rng.randint(0, len(words) - n)
            words = words[start:start + n]
        if self.delete_prob > 0 and len(words) > 1:
            kept = [w for w in words if rng.random() >= self.delete_prob]
            words = kept or [rng.choice(words)]
        if self.mask_prob > 0:
            words = [self.mask_token if rng.random() < self.mask_prob else w for w in words]
        return " ".join(words)

    def __call__(self, texts: Sequence[str], seed: int, step: int, rank: int, stream: int = 0) -> list[str]:
        """Augment a batch; deterministic in (seed, step, rank, stream)."""
        if not self.active:
            return list(texts)
        rng = random.Random(f"{seed}:{step}:{rank}:{stream}")
        return [self.one(t, rng) for t in texts]
