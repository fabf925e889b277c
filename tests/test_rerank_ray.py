"""Rerankers on real Ray: a tiny cross-encoder trains with 2 Ray Train workers and its checkpoint
loads in sentence-transformers with the same scores; mining embeds with Ray actors."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from negatron.cluster.config import ConfigError, load_config
from negatron.trainers.train import run_training
from tests.helpers import write_synthetic_task

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_local")]


def test_mining_with_ray_actors_then_cross_encoder_trains_and_loads(tmp_path, tiny_model_dir):
    from sentence_transformers import CrossEncoder as STCrossEncoder

    from negatron.trainers.cross_encoder import CrossEncoder
    from negatron.trainers.mine import mine

    task = write_synthetic_task(tmp_path / "task", n_train=96)
    stats = mine(str(tiny_model_dir), task / "train.parquet", tmp_path / "mined.parquet", k=12, skip=0, take=3,
                 workers=2, cpus_per_worker=0.5)
    rows = pq.read_table(tmp_path / "mined.parquet").to_pylist()
    assert stats["pairs"] == 96 and all(r["positive_id"] not in r["negative_ids"] for r in rows)

    cfg = load_config(None, [
        "model.kind=cross-encoder", f"model.path={tiny_model_dir}", "model.max_length=64",
        f"data.train={tmp_path / 'mined.parquet'}", "data.num_negatives=3", f"data.dev={task / 'dev'}",
        f"eval.first_stage={tiny_model_dir}", "eval.rerank_depth=10",
        "trainer.num_workers=2", "trainer.batch_size=4", "trainer.max_steps=24", "trainer.checkpoint_every=12",
        "optim.lr=1e-3", "optim.schedule=constant", "loss.temperature=1.0", "trainer.log_every_s=0.001",
        f"run.storage_path={tmp_path / 'runs'}", "run.name=ce"])
    res = run_training(cfg)
    m = json.loads((res.run_dir / "metrics.json").read_text())
    assert m["steps"] == 24 and 0.0 <= m["mrr@10"] <= 1.0
    history = json.loads((res.run_dir / "history.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])  # the listwise loss falls

    pairs = [("find the helper for alpha item 3", "def helper_3(x):\n    return x + 3"),
             ("find the helper for beta item 9", "def helper_2(x):\n    return x + 2")]
    ours = CrossEncoder.from_pretrained(res.final_dir).score([q for q, _ in pairs], [t for _, t in pairs])
    theirs = STCrossEncoder(str(res.final_dir), device="cpu").predict(pairs)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_cross_encoder_config_rejects_a_bank(tmp_path):
    with pytest.raises(ConfigError, match="memory bank is for bi-encoders"):
        load_config(None, ["model.kind=cross-encoder", "bank.size=128"])
