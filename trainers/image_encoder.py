"""The image encoder: a small ResNet-style CNN in plain torch with the text encoder's interface
(``dim``, ``encode_batch``, ``encode``, ``save``, ``from_pretrained``), so the contrastive loss,
the memory bank, the momentum encoder, Ray Train, Tune and Serve use it unchanged; and its input
conventions (``to_tensor``, ``prepare``, ``decode_images``, ``png_bytes``).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .model_io import IMAGE_CONFIG, ModelLoadError, in_run_folder, local_model_folder

BUILTIN_CNN = "cnn"


class _Block(nn.Module):
    """A ResNet basic block with GroupNorm (no batch statistics: the same on every worker)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(min(8, cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(min(8, cout), cout)
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.GroupNorm(min(8, cout), cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(y)) + self.skip(x))


@dataclass
class ImageEncoderSettings:
    channels: int = 1  # input channels (1 grey, 3 RGB)
    image_size: int = 16  # inputs are resized to image_size × image_size
    width: int = 32  # channels of the first stage; stages have width, 2·width, 4·width
    dim: int = 64  # embedding size (a projection head on the pooled features)
    normalize: bool = True


class ImageEncoder(nn.Module):
    """Images (B×C×S×S floats in [0, 1]) → embeddings (B×D). ``features`` gives the pooled
    backbone output (B×4·width), what linear probes are trained on."""

    kind = "image"

    def __init__(self, settings: ImageEncoderSettings | None = None):
        super().__init__()
        s = self.settings = settings or ImageEncoderSettings()
        w = s.width
        self.stem = nn.Sequential(nn.Conv2d(s.channels, w, 3, 1, 1, bias=False), nn.GroupNorm(min(8, w), w), nn.ReLU())
        self.stages = nn.Sequential(_Block(w, w, 1), _Block(w, 2 * w, 2), _Block(2 * w, 4 * w, 2))
        self.head = nn.Sequential(nn.Linear(4 * w, 4 * w), nn.ReLU(), nn.Linear(4 * w, s.dim))
        self.normalize = s.normalize

    @property
    def dim(self) -> int:
        return self.settings.dim

    @property
    def image_size(self) -> int:
        return self.settings.image_size

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = prepare(x, self.settings.image_size, self.settings.channels)
        return self.stages(self.stem(x)).mean(dim=(2, 3))  # B×4w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        emb = self.head(self.features(x))  # B×D
        return F.normalize(emb, dim=-1) if self.normalize else emb

    def batch_of(self, images) -> torch.Tensor:
        """One B×C×S×S tensor from images of any sizes and channel counts."""
        if isinstance(images, (list, tuple)) and len({np.shape(a) for a in images}) > 1:
            s = self.settings
            return torch.cat([prepare(to_tensor([a]), s.image_size, s.channels) for a in images])
        return to_tensor(images)

    def encode_batch(self, images, max_length: int | None = None, role: str | None = None) -> torch.Tensor:
        """A batch of images (tensor or list of arrays) → B×D; ``max_length`` is for text and ignored."""
        device = next(self.parameters()).device
        return self(to_tensor(images).to(device))

    @torch.no_grad()
    def encode(self, images, batch_size: int = 256, features: bool = False, **_) -> np.ndarray:
        """Embed N images → float32 N×D (or N×4·width pooled features with ``features``).

        ``images``: a tensor, an array, or a list of arrays (sizes may differ: each is resized).
        """
        was = self.training
        self.eval()
        x = self.batch_of(images)
        device = next(self.parameters()).device
        fn = self.features if features else self
        out = [fn(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
        self.train(was)
        return torch.cat(out).numpy() if out else np.zeros((0, self.dim), np.float32)

    # -- files --

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(folder / "model.safetensors"))
        (folder / IMAGE_CONFIG).write_text(json.dumps({"format": 1, **self.settings.__dict__}, indent=2))
        return folder

    @classmethod
    def from_pretrained(cls, path: str | Path, **_) -> "ImageEncoder":
        """Load a folder written by ``save`` (safetensors only).

        Raises:
            ModelLoadError: the folder is missing, not an image encoder, or its weights are corrupt.
        """
        folder = in_run_folder(local_model_folder(path), IMAGE_CONFIG)
        conf = folder / IMAGE_CONFIG
        if not conf.is_file():
            raise ModelLoadError(f"{folder}: not a Negatron image encoder (no {IMAGE_CONFIG})")
        try:
            raw = json.loads(conf.read_text())
            settings = ImageEncoderSettings(**{k: raw[k] for k in ImageEncoderSettings.__dataclass_fields__ if k in raw})
        except (ValueError, TypeError) as e:
            raise ModelLoadError(f"{conf}: unreadable settings: {e}") from None
        enc = cls(settings)
        try:
            sd = load_file(str(folder / "model.safetensors"))
            enc.load_state_dict(sd)
        except (OSError, SafetensorError, RuntimeError) as e:
            raise ModelLoadError(f"{folder / 'model.safetensors'}: cannot load the weights: {e}") from None
        return enc


def is_image_model(path: str | Path) -> bool:
    if str(path) == BUILTIN_CNN:
        return True
    try:
        p = local_model_folder(path)
    except ModelLoadError:
        return False
    return (in_run_folder(p, IMAGE_CONFIG) / IMAGE_CONFIG).is_file()


def build_image_encoder(path: str, seed: int = 0, **settings) -> ImageEncoder:
    """``cnn``: a freshly initialised encoder (seeded); else a saved folder."""
    if str(path) == BUILTIN_CNN:
        torch.manual_seed(seed)
        return ImageEncoder(ImageEncoderSettings(**settings))
    return ImageEncoder.from_pretrained(path)


def to_tensor(images) -> torch.Tensor:
    """A B×C×H×W float tensor from a tensor, an N×H×W / N×H×W×C uint8 array or a list of arrays."""
    if isinstance(images, torch.Tensor):
        x = images
    else:
        arr = np.stack([np.asarray(a) for a in images]) if isinstance(images, (list, tuple)) else np.asarray(images)
        x = torch.from_numpy(np.ascontiguousarray(arr))
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    if x.dim() == 3:  # N×H×W grey
        x = x.unsqueeze(1)
    elif x.dim() == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):  # N×H×W×C
        x = x.permute(0, 3, 1, 2)
    return x.float()


def prepare(x: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """Resize to size×size and match the channel count (grey ↔ RGB)."""
    if x.shape[1] != channels:
        x = x.mean(1, keepdim=True) if channels == 1 else x.expand(-1, channels, -1, -1)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x


def decode_images(blobs: Sequence[bytes]) -> np.ndarray:
    """PNG/JPEG bytes → N×H×W (grey) or N×H×W×3 uint8; all images must share one size."""
    from PIL import Image

    arrs = []
    for i, blob in enumerate(blobs):
        try:
            with Image.open(io.BytesIO(blob)) as im:
                im = im.convert("L") if im.mode in ("L", "1", "P", "I", "I;16", "LA") else im.convert("RGB")
                arrs.append(np.asarray(im, dtype=np.uint8))
        except Exception as e:  # PIL raises several types for bad bytes
            raise ValueError(f"image {i}: cannot decode ({type(e).__name__}: {e})") from None
    shapes = {a.shape for a in arrs}
    if len(shapes) > 1:
        raise ValueError(f"images have different shapes: {sorted(shapes)[:3]}")
    return np.stack(arrs) if arrs else np.zeros((0, 1, 1), np.uint8)


def png_bytes(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()
