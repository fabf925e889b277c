"""The built-in image dataset: scikit-learn's bundled handwritten digits (no download) as Parquet,
the image counterpart of ``stdlib_data``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from .image_encoder import png_bytes


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
