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
        f"data.negatives_corpus={stats['negatives_corpus']}",
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


def test_quickstart_with_reranker_runs_every_stage_and_saves_a_dev_chosen_weight_that_eval_uses(
        tmp_path, tiny_model_dir, capsys):
    """`negatron quickstart --with-reranker` end to end on a tiny model: zero-shot and fine-tuned
    test metrics, quickstart.json and the time-by-stage table; then mining with the fine-tuned
    model, a cross-encoder trained on Ray, the fusion weight chosen on dev, saved beside it and used
    by `negatron eval --reranker`."""
    import shutil

    from negatron.cluster.cli import main
    from negatron.trainers.cross_encoder import RERANK_FILE, saved_rerank_weight

    task = write_synthetic_task(tmp_path / "task", n_train=64)
    shutil.copytree(task / "dev", task / "test")
    assert main(["quickstart", "--with-reranker", "--reranker-steps", "10", "--rerank-depth", "10",
                 f"model.path={tiny_model_dir}", f"data.train={task / 'train.parquet'}",
                 "trainer.max_steps=4", "trainer.checkpoint_every=4", "trainer.batch_size=4", "bank.size=0",
                 "bank.momentum=0", "model.max_length=32", "trainer.log_every_s=60", "trainer.cpus_per_worker=0.5",
                 f"run.storage_path={tmp_path / 'runs'}", "run.name=qs"]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "runs" / "quickstart.json").read_text())
    assert summary["train"]["steps"] == 4 and 0 <= summary["fine_tuned"]["mrr@10"] <= 1
    stages = summary["stage_s"]
    assert list(stages) == ["data", "zero-shot evaluation", "training", "evaluation", "mining", "reranker training",
                            "two-stage evaluation", "total"]
    assert all(v >= 0 for v in stages.values()) and stages["total"] >= stages["training"] > 0
    assert "time by stage:" in out and "two-stage evaluation" in out.split("time by stage:")[1]
    assert f"MRR@10 {summary['zero_shot']['mrr@10']:.4f} -> {summary['fine_tuned']['mrr@10']:.4f}" in out
    # the plot starts at the zero-shot dev score, measured on the dev subset the run checks
    assert 0 <= summary["zero_shot_dev"]["mrr@10"] <= 1 and (tmp_path / "runs" / "qs" / "training.png").stat().st_size > 0

    rr = summary["reranker"]
    w = rr["rerank_weight"]
    assert saved_rerank_weight(rr["reranker"]) == w
    curve = {float(k): v for k, v in rr["dev_mrr@10_by_weight"].items()}  # JSON keys are strings
    assert set(curve) == {i / 10 for i in range(11)} and curve[w] == max(curve.values())
    # the test set is a copy of the dev set here, so the fused test MRR@10 is the chosen dev value
    assert rr[f"reranked@w={w:g}"]["mrr@10"] == pytest.approx(curve[w])
    saved = json.loads((tmp_path / "runs" / "qs-reranker" / "final" / RERANK_FILE).read_text())
    bi_encoder = summary["final_model"]
    assert saved["rerank_depth"] == 10 and saved["first_stage"] == bi_encoder
    capsys.readouterr()
    assert main(["eval", "--model", bi_encoder, "--data", str(task / "dev"), "--reranker", rr["reranker"],
                 "--rerank-depth", "10", "--out", str(tmp_path / "two.json")]) == 0
    assert json.loads((tmp_path / "two.json").read_text())["reranked"]["mrr@10"] == pytest.approx(
        rr[f"reranked@w={w:g}"]["mrr@10"])
