"""Seeded augmentations (no Ray), the knobs Ray Tune searches: text (``TextAugmenter``) and
images (``ImageAugmenter``, SimCLR views in torch).

Text:

- span cropping (Contriever): keep a random contiguous span of ``crop_min_ratio``..100% of words
- word deletion: drop each word with ``delete_prob`` (at least one word survives)
- token masking: replace each word with the tokenizer's mask token with ``mask_prob``
- dropout-only views (SimCSE): the query is the positive text itself; dropout makes the views differ

The same (seed, step, rank) gives the same output, so a resumed run repeats its augmentations.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .seeds import image_generator, text_rng


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
        rng = text_rng(seed, step, rank, stream)
        return [self.one(t, rng) for t in texts]


@dataclass(frozen=True)
class ImageAugmenter:
    """SimCLR-style views, vectorised over the batch, in torch.

    ``strength`` (0..1) sets every transform at once; a per-transform value (not None) overrides
    it. The same (seed, step, rank, stream) gives the same views, so a resumed run repeats them.
    """

    strength: float = 0.5
    crop_min: Optional[float] = None  # smallest crop area fraction (random resized crop)
    flip: Optional[float] = None  # horizontal flip probability
    brightness: Optional[float] = None  # ± fraction
    contrast: Optional[float] = None  # ± fraction
    noise: Optional[float] = None  # gaussian noise std (pixel range 0..1)
    blur: Optional[float] = None  # probability of a 3×3 gaussian blur
    settings: dict = field(init=False, compare=False, default_factory=dict)

    def __post_init__(self):
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"augment strength must be in [0, 1], got {self.strength}")
        s = self.strength
        derived = {"crop_min": 1.0 - 0.7 * s, "flip": 0.0, "brightness": 0.4 * s, "contrast": 0.4 * s,
                   "noise": 0.1 * s, "blur": 0.5 * s}
        for k, v in derived.items():
            given = getattr(self, k)
            self.settings[k] = float(v if given is None else given)
        if not 0.05 <= self.settings["crop_min"] <= 1.0:
            raise ValueError(f"crop_min must be in [0.05, 1], got {self.settings['crop_min']}")

    def __call__(self, x: torch.Tensor, seed: int, step: int, rank: int, stream: int) -> torch.Tensor:
        """x: B×C×H×W in [0, 1] → an augmented copy (same shape)."""
        g = image_generator(seed, step, rank, stream)
        b = x.shape[0]
        cfg = self.settings

        def u(lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(b, generator=g)

        # random resized crop (+ flip) as one affine resampling per image
        area = u(cfg["crop_min"], 1.0)
        log_r = u(math.log(3 / 4), math.log(4 / 3))
        ratio = torch.exp(log_r)
        sx = torch.sqrt(area * ratio).clamp(max=1.0)
        sy = torch.sqrt(area / ratio).clamp(max=1.0)
        tx = (1 - sx) * (2 * torch.rand(b, generator=g) - 1)
        ty = (1 - sy) * (2 * torch.rand(b, generator=g) - 1)
        flip = torch.where(torch.rand(b, generator=g) < cfg["flip"], -1.0, 1.0)
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = sx * flip, tx
        theta[:, 1, 1], theta[:, 1, 2] = sy, ty
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        y = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
        # colour: brightness and contrast
        bright = 1.0 + u(-cfg["brightness"], cfg["brightness"])
        cont = 1.0 + u(-cfg["contrast"], cfg["contrast"])
        mean = y.mean(dim=(1, 2, 3), keepdim=True)
        y = (y - mean) * cont.view(-1, 1, 1, 1) + mean
        y = y * bright.view(-1, 1, 1, 1)
        # blur on a random subset
        if cfg["blur"] > 0:
            k = torch.tensor([1.0, 2.0, 1.0])
            k = (k[:, None] * k[None, :]) / 16.0
            c = y.shape[1]
            blurred = F.conv2d(F.pad(y, (1, 1, 1, 1), mode="replicate"), k.expand(c, 1, 3, 3).contiguous(), groups=c)
            pick = (torch.rand(b, generator=g) < cfg["blur"]).view(-1, 1, 1, 1)
            y = torch.where(pick, blurred, y)
        if cfg["noise"] > 0:
            y = y + cfg["noise"] * torch.randn(y.shape, generator=g)
        return y.clamp(0.0, 1.0)


