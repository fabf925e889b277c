"""Images on the same machinery as text: a small ResNet-style encoder, seeded augmentations,
a sharded two-view stream (SimCLR), the built-in digits dataset, and k-NN / linear-probe metrics.

The image encoder has the text encoder's interface (``dim``, ``encode_batch``, ``encode``,
``save``, ``from_pretrained``), so the contrastive loss, the memory bank, the momentum encoder,
Ray Train, Tune and Serve use it unchanged. Everything here is pure torch/numpy (no Ray).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .data import RowSchedule, stable_id
from .model_io import IMAGE_CONFIG, ModelLoadError, in_run_folder

BUILTIN_CNN = "cnn"


# -- the encoder ----------------------------------------------------------------------------------

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

    def encode_batch(self, images, max_length: int | None = None) -> torch.Tensor:
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
        folder = in_run_folder(Path(path), IMAGE_CONFIG)
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
    p = Path(path)
    return str(path) == BUILTIN_CNN or (in_run_folder(p, IMAGE_CONFIG) / IMAGE_CONFIG).is_file()


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


# -- augmentations ---------------------------------------------------------------------------------

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
        g = torch.Generator().manual_seed(_mix(seed, step, rank, stream))
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


def _mix(*parts: int) -> int:
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFF)) * 1099511628211) & ((1 << 63) - 1)
    return h


# -- data ------------------------------------------------------------------------------------------

class ImageStream(RowSchedule):
    """Global step s → this rank's B images (uint8 → float) and their ids, in the same row
    order as the text pair stream: one seeded permutation per epoch, laid end to end."""

    def __init__(self, table: pa.Table, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0):
        super().__init__(table.num_rows, batch_size, rank, world, seed)
        self.images = decode_images(table.column("image").to_pylist())  # N×H×W[×C] uint8
        self.ids = np.array([stable_id(v) for v in table.column("id").to_pylist()], dtype=np.int64)

    def batch(self, step: int) -> dict:
        rows = self.local_rows(step)
        x = to_tensor(self.images[rows])
        return {"rows": rows, "query": x, "positive": x, "pos_ids": torch.from_numpy(self.ids[rows])}


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


def build_digits_dataset(out: str | Path, test_fraction: float = 0.2, seed: int = 0) -> dict:
    """scikit-learn's bundled handwritten digits (1797 8×8 images, no download) → Parquet:

    ``train.parquet`` (contrastive training: id, image PNG bytes, label), and an eval folder
    ``eval/`` with ``train.parquet`` / ``test.parquet`` for the k-NN and linear-probe metrics
    (a stratified split; labels are never used in contrastive training).
    """
    from sklearn.datasets import load_digits

    out = Path(out)
    (out / "eval").mkdir(parents=True, exist_ok=True)
    d = load_digits()
    imgs = np.round(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # 0..16 → 0..255
    labels = d.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        test[rng.permutation(idx)[: int(round(len(idx) * test_fraction))]] = True

    def table(mask: np.ndarray) -> pa.Table:
        idx = np.flatnonzero(mask)
        return pa.table({"id": [f"digit-{i}" for i in idx], "image": [png_bytes(imgs[i]) for i in idx],
                         "label": pa.array(labels[idx], pa.int64())})

    from negatron.cluster.files import write_json, write_parquet

    write_parquet(table(~test), out / "train.parquet")  # temp file + rename each
    write_parquet(table(~test), out / "eval" / "train.parquet")
    write_parquet(table(test), out / "eval" / "test.parquet")
    info = {"dataset": "sklearn digits", "images": int(len(labels)), "train": int((~test).sum()),
            "test": int(test.sum()), "size": list(imgs.shape[1:]), "classes": int(len(np.unique(labels)))}
    write_json(out / "dataset.json", info)
    return info


# -- evaluation ------------------------------------------------------------------------------------

@dataclass
class ImageEval:
    """Frozen-embedding evaluation on a folder with train.parquet / test.parquet (id, image, label)."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray

    @classmethod
    def load(cls, folder: str | Path) -> "ImageEval":
        from .schema import check_images

        folder = Path(folder)
        parts = []
        for name in ("train", "test"):
            t = check_images(folder / f"{name}.parquet", labels=True)
            parts += [decode_images(t.column("image").to_pylist()), np.asarray(t.column("label").to_pylist())]
        return cls(*parts)

    def evaluate(self, encoder: ImageEncoder, k: int = 20, shots: int = 5, draws: int = 5) -> dict:
        """On frozen features of the eval train/test split:

        - ``knn_acc``: cosine k-NN on the embeddings (similarity-weighted votes);
        - ``probe_acc``: a linear probe (logistic regression, standardised pooled features)
          trained on every labelled train image;
        - ``fewshot_probe_acc``: the same probe from ``shots`` labelled images per class, the
          mean over ``draws`` seeded draws (0 shots = skip). On small, easy data the full probe
          saturates even on random features; the few-shot probe shows what pretraining adds.
        """
        out = {}
        tr, te = encoder.encode(self.train_x), encoder.encode(self.test_x)
        out["knn_acc"] = knn_accuracy(tr, self.train_y, te, self.test_y, k)
        ftr, fte = encoder.encode(self.train_x, features=True), encoder.encode(self.test_x, features=True)
        out["probe_acc"] = probe_accuracy(ftr, self.train_y, fte, self.test_y)
        if shots:
            accs = []
            for draw in range(draws):
                rng = np.random.default_rng(draw)
                idx = np.concatenate([rng.choice(np.flatnonzero(self.train_y == c), min(shots, int((self.train_y == c).sum())),
                                                 replace=False) for c in np.unique(self.train_y)])
                accs.append(probe_accuracy(ftr[idx], self.train_y[idx], fte, self.test_y))
            out["fewshot_probe_acc"] = float(np.mean(accs))
        return out


def probe_accuracy(train: np.ndarray, train_y: np.ndarray, test: np.ndarray, test_y: np.ndarray) -> float:
    """Logistic regression on standardised features; accuracy on ``test``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train)
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(scaler.transform(train), train_y)
    return float((clf.predict(scaler.transform(test)) == test_y).mean())


def knn_accuracy(train: np.ndarray, train_y: np.ndarray, test: np.ndarray, test_y: np.ndarray, k: int = 20) -> float:
    """Cosine k-NN with similarity-weighted votes (exp(s/0.07), as in InstDisc/DINO)."""
    a = train / np.maximum(np.linalg.norm(train, axis=1, keepdims=True), 1e-12)
    b = test / np.maximum(np.linalg.norm(test, axis=1, keepdims=True), 1e-12)
    sims = b @ a.T  # T×N
    k = min(k, len(a))
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    classes = np.unique(train_y)
    votes = np.zeros((len(b), len(classes)))
    w = np.exp(np.take_along_axis(sims, top, axis=1) / 0.07)
    cls_idx = np.searchsorted(classes, train_y[top])
    for j in range(k):
        np.add.at(votes, (np.arange(len(b)), cls_idx[:, j]), w[:, j])
    return float((classes[votes.argmax(1)] == test_y).mean())
