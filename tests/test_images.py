"""Images without Ray: digits data, augmentations, the encoder's files, the stream, the metrics,
and an in-process run that resumes exactly."""

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from negatron.cluster.config import ConfigError, load_config
from negatron.trainers.checkpoint import read_meta
from negatron.trainers.data import PairStream
from negatron.trainers.encoder import ModelLoadError, load_encoder
from negatron.trainers.images import (ImageAugmenter, ImageEncoder, ImageEncoderSettings, ImageEval, ImageStream,
                                      build_digits_dataset, decode_images, knn_accuracy, png_bytes)
from negatron.trainers.loop import build_encoder, run_worker
from negatron.trainers.schema import SchemaError
from negatron.trainers.train import validate_inputs


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    build_digits_dataset(out)
    return out


def test_digits_dataset_is_the_bundled_one(digits):
    from sklearn.datasets import load_digits

    train, test = pq.read_table(digits / "eval" / "train.parquet"), pq.read_table(digits / "eval" / "test.parquet")
    assert train.num_rows + test.num_rows == 1797
    assert not set(train.column("id").to_pylist()) & set(test.column("id").to_pylist())
    assert set(test.column("label").to_pylist()) == set(range(10))  # stratified
    imgs = decode_images(train.column("image").to_pylist()[:5])
    d = load_digits()
    i = int(train.column("id")[0].as_py().split("-")[1])
    np.testing.assert_array_equal(imgs[0], np.round(d.images[i] * 255 / 16).astype(np.uint8))
    assert pq.read_table(digits / "train.parquet").num_rows == train.num_rows


def test_augmentations_are_seeded_and_vary():
    x = torch.rand(6, 1, 16, 16)
    aug = ImageAugmenter(0.8)
    a, b = aug(x, 1, 5, 0, 0), aug(x, 1, 5, 0, 0)
    torch.testing.assert_close(a, b)  # same (seed, step, rank, stream): same views
    assert not torch.allclose(a, aug(x, 1, 5, 0, 1))  # the other view differs
    assert not torch.allclose(a, aug(x, 1, 6, 0, 0))
    assert not torch.allclose(a, aug(x, 2, 5, 0, 0))
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert ImageAugmenter(0.5, flip=1.0, blur=0.0).settings["flip"] == 1.0  # a per-transform value wins
    with pytest.raises(ValueError, match="strength"):
        ImageAugmenter(1.5)


def test_encoder_round_trip_and_bad_folders(tmp_path):
    torch.manual_seed(0)
    enc = ImageEncoder(ImageEncoderSettings(width=8, dim=16))
    x = np.random.default_rng(0).integers(0, 255, (5, 8, 8), dtype=np.uint8)
    enc.save(tmp_path / "m")
    back = load_encoder(str(tmp_path / "m"))
    assert isinstance(back, ImageEncoder) and back.dim == 16
    np.testing.assert_allclose(back.encode(x), enc.encode(x), atol=1e-6)
    # images of different sizes in one call are resized one by one
    mixed = [x[0], np.kron(x[1], np.ones((2, 2), np.uint8))]
    assert back.encode(mixed).shape == (2, 16)
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(ModelLoadError, match="cannot load the weights"):
        ImageEncoder.from_pretrained(tmp_path / "m")
    with pytest.raises(ModelLoadError, match="not a Negatron image encoder"):
        ImageEncoder.from_pretrained(tmp_path)


def test_stream_follows_the_text_row_order(digits):
    table = pq.read_table(digits / "train.parquet")
    a, b = ImageStream(table, 8, 0, 2, seed=3), ImageStream(table, 8, 1, 2, seed=3)
    pairs = pa.table({"query": ["q"] * table.num_rows, "positive": ["p"] * table.num_rows,
                      "query_id": table.column("id"), "positive_id": table.column("id")})
    ref = PairStream(pairs, 8, 0, 2, seed=3)
    np.testing.assert_array_equal(a.batch(7)["rows"], ref.batch(7)["rows"])
    assert not set(a.batch(7)["rows"]) & set(b.batch(7)["rows"])
    assert a.batch(7)["query"].shape == (8, 1, 8, 8)


def test_knn_accuracy_on_separable_points():
    rng = np.random.default_rng(0)
    centers = np.eye(4) * 10
    y = np.repeat(np.arange(4), 30)
    x = centers[y] + rng.normal(0, 0.1, (120, 4))
    assert knn_accuracy(x[::2], y[::2], x[1::2], y[1::2], k=5) == 1.0


def test_bad_image_inputs_are_named(tmp_path, digits):
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "image": [png_bytes(np.zeros((8, 8), np.uint8)), b"garbage"]}), bad)
    cfg = load_config(None, ["model.kind=image", f"data.train={bad}", "trainer.batch_size=1", "trainer.num_workers=1"])
    with pytest.raises(SchemaError, match="image 1: cannot decode"):
        validate_inputs(cfg)
    pq.write_table(pa.table({"id": ["a"], "pixels": [b"x"]}), bad)
    with pytest.raises(SchemaError, match="missing column.*'image'"):
        validate_inputs(cfg)
    cfg = load_config(None, ["model.kind=image", f"data.train={digits / 'train.parquet'}", "model.path=" + str(tmp_path)])
    with pytest.raises(ConfigError, match="not an image encoder folder"):
        validate_inputs(cfg)


def test_in_process_image_training_learns_and_resumes_exactly(tmp_path, digits):
    """SimCLR with a momentum bank: k-NN accuracy rises over the random init, and 12 steps straight
    equal 6 steps + resume + 6 steps."""
    saved = {}

    def keep(metrics, d, tag=""):
        dst = tmp_path / f"ck{tag}{metrics['step']}"
        shutil.copytree(d, dst)
        saved[f"{tag}{metrics['step']}"] = (dst, metrics)

    cfg = load_config(None, [
        "model.kind=image", f"data.train={digits / 'train.parquet'}", f"data.dev={digits / 'eval'}",
        "model.image_width=8", "trainer.batch_size=64", "trainer.max_steps=12", "trainer.checkpoint_every=6",
        "bank.size=256", "bank.momentum=0.9", "optim.lr=3e-3", "loss.temperature=0.2", "eval.probe_shots=2"])
    torch.set_num_threads(2)
    run_worker(cfg, 0, 1, keep, log=lambda s: None)
    run_worker(cfg, 0, 1, lambda m, d: keep(m, d, "r"), resume_dir=str(saved["6"][0]), log=lambda s: None)
    straight, resumed = saved["12"], saved["r12"]
    a, b = ImageEncoder.from_pretrained(straight[0]).state_dict(), ImageEncoder.from_pretrained(resumed[0]).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    assert straight[1]["bank_checksum"] == resumed[1]["bank_checksum"]
    assert read_meta(straight[0])["step"] == 12
    m = straight[1]
    assert {"dev_knn_acc", "dev_probe_acc", "dev_fewshot_probe_acc"} <= set(m)
    random_init = ImageEval.load(digits / "eval").evaluate(build_encoder(cfg), shots=0)
    assert m["dev_knn_acc"] > random_init["knn_acc"]
