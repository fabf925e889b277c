"""Images on real Ray: 2 Ray Train workers with the memory bank, then the trained encoder served
by Ray Serve on /v1/images/embeddings, equal to direct embeddings."""

import base64
import json

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest

from negatron.cluster.config import load_config
from bench.loadgen import free_port
from negatron.trainers.images import ImageEncoder, build_digits_dataset, decode_images
from negatron.trainers.train import run_training

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_local")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgray")
    build_digits_dataset(root / "digits")
    cfg = load_config(None, [
        "model.kind=image", f"data.train={root / 'digits' / 'train.parquet'}", f"data.dev={root / 'digits' / 'eval'}",
        "model.image_width=8", "trainer.num_workers=2", "trainer.cpus_per_worker=0.5", "trainer.batch_size=32",
        "trainer.max_steps=16", "trainer.checkpoint_every=8", "bank.size=128", "bank.momentum=0.9",
        "optim.lr=3e-3", "eval.probe_shots=2", f"run.storage_path={root}", "run.name=img"])
    return root, run_training(cfg)


def test_two_workers_train_images_with_the_bank(trained):
    root, res = trained
    assert res.metrics["steps"] == 16 and {"knn_acc", "probe_acc", "fewshot_probe_acc"} <= set(res.metrics)
    meta = json.loads((res.final_dir / "negatron.json").read_text())
    sums = meta["metrics"]["bank_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]  # the same bank on both workers
    enc = ImageEncoder.from_pretrained(res.run_dir)  # the run folder resolves to final/
    assert enc.encode(np.zeros((2, 8, 8), np.uint8)).shape == (2, 64)
    assert (res.best_dir / "model.safetensors").is_file() and (res.run_dir / "training.png").is_file()


def test_served_image_embeddings_equal_direct(trained):
    from ray import serve

    from negatron.serve.app import resolve_section, start

    root, res = trained
    cfg = load_config(None, [f"serve.encoder.path={res.final_dir}", f"serve.port={free_port()}",
                             "serve.encoder.scale.num_cpus=0.25", "serve.limits.max_texts=8"])
    url = start(resolve_section(cfg), blocking_wait_s=300)
    try:
        blobs = pq.read_table(root / "digits" / "eval" / "test.parquet").column("image").to_pylist()[:5]
        b64 = [base64.b64encode(b).decode() for b in blobs]
        b64[1] = "data:image/png;base64," + b64[1]
        r = httpx.post(url + "/v1/images/embeddings", json={"input": b64}, timeout=60)
        assert r.status_code == 200, r.text
        got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
        want = ImageEncoder.from_pretrained(res.final_dir).encode(decode_images(blobs))
        np.testing.assert_allclose(got, want, atol=1e-5)
        bad = [({"input": []}, 400, "empty_input"), ({"input": ["@@@"]}, 400, "invalid_image"),
               ({"input": [base64.b64encode(b"GIF89a....").decode()]}, 400, "invalid_image"),
               ({"input": b64 * 2}, 413, "too_many_inputs")]
        for body, status, code in bad:
            r = httpx.post(url + "/v1/images/embeddings", json=body, timeout=60)
            assert r.status_code == status and r.json()["error"]["code"] == code, (body, r.text)
        r = httpx.post(url + "/v1/embeddings", json={"input": "some text"}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_modality"
    finally:
        serve.shutdown()
