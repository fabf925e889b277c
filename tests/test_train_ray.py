"""Real Ray Train runs on a tiny model: 2 workers train, checkpoints load elsewhere, faults survive."""

import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from negatron.cluster.config import load_config
from negatron.trainers.encoder import Encoder
from bench.loadgen import tagged_pids
from negatron.trainers.train import registered_steps, run_training

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_local")]


def _cfg(tmp_path, tiny_model_dir, stdlib_data, name, *extra):
    return load_config(None, [
        f"model.path={tiny_model_dir}", f"data.train={stdlib_data / 'train.parquet'}",
        f"data.dev={stdlib_data / 'dev'}", "data.max_dev_queries=60", "model.max_length=48",
        "trainer.num_workers=2", "trainer.batch_size=8", "trainer.cpus_per_worker=0.5",
        "optim.lr=1e-3", "optim.schedule=constant", "trainer.log_every_s=0.001",
        f"run.storage_path={tmp_path}", f"run.name={name}", *extra])


def test_two_workers_train_and_checkpoint_loads_everywhere(tmp_path, tiny_model_dir, stdlib_data):
    cfg = _cfg(tmp_path, tiny_model_dir, stdlib_data, "two", "trainer.max_steps=40",
               "trainer.checkpoint_every=20")
    res = run_training(cfg)
    m = json.loads((res.run_dir / "metrics.json").read_text())
    for k in ["recall@1", "recall@10", "recall@100", "mrr@10", "ndcg@10", "alignment", "uniformity", "steps",
              "samples_per_s", "wall_s"]:
        assert k in m
    assert m["steps"] == 40
    history = json.loads((res.run_dir / "history.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])  # loss falls
    assert (res.run_dir / "training.png").stat().st_size > 1000
    assert (res.run_dir / "best" / "model.safetensors").is_file()
    for folder in ("final", "best"):  # each describes itself: a model card with the dev metrics, ST's config
        card = (res.run_dir / folder / "README.md").read_text()
        assert card.startswith("---") and "| mrr@10 |" in card and "(training.png)" in card
        assert (res.run_dir / folder / "training.png").is_file()
        assert json.loads((res.run_dir / folder / "config_sentence_transformers.json").read_text())[
            "similarity_fn_name"] == "cosine"

    texts = ["return the sorted list of keys", "def f(x):\n    return x + 1"]
    ours = Encoder.from_pretrained(str(res.final_dir)).encode(texts)
    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(str(res.final_dir), device="cpu").encode(texts)
    np.testing.assert_allclose(st, ours, atol=1e-5)
    import torch
    from transformers import AutoModel, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(res.final_dir)
    hf = AutoModel.from_pretrained(res.final_dir)
    b = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = hf(**b).last_hidden_state
    mean = (h * b["attention_mask"][..., None]).sum(1) / b["attention_mask"].sum(1, keepdim=True)
    np.testing.assert_allclose(torch.nn.functional.normalize(mean, dim=-1).numpy(), ours, atol=1e-5)


def expected_data_digest(cfg, steps: int) -> str:
    """The documented data rule: step s trains on global batch s of the seeded epoch permutations,
    so a resumed run continues at the saved position and ends with this digest."""
    import pyarrow.parquet as pq

    from negatron.trainers.data import PairStream
    from negatron.trainers.loop import rows_digest

    stream = PairStream(pq.read_table(cfg.data.train), cfg.trainer.batch_size, 0, cfg.trainer.num_workers,
                        seed=cfg.trainer.seed)
    digest = ""
    for step in range(steps):
        digest = rows_digest(digest, stream.global_rows(step))
    return digest


def check_resumes(run_dir: Path, history: list[dict], every: int) -> list[int]:
    """Each resume starts at a saved checkpoint with that checkpoint's bank and optimizer state."""
    saved = {}
    for meta in run_dir.glob("checkpoint_*/negatron.json"):
        m = json.loads(meta.read_text())
        saved[m["step"]] = m["metrics"]
    steps = []
    for r in (h for h in history if "resumed_from" in h):
        step = r["resumed_from"]
        assert step in saved and step % every == 0, (step, sorted(saved))
        assert r["bank_checksum"] == saved[step].get("bank_checksum")
        assert r["optimizer_checksum"] == saved[step]["optimizer_checksum"]
        assert r.get("guide_bank_checksum") == saved[step].get("guide_bank_checksum")
        steps.append(step)
    return steps


def test_two_worker_sigkills_resume_from_checkpoints(tmp_path, tiny_model_dir, stdlib_data):
    cfg = _cfg(tmp_path, tiny_model_dir, stdlib_data, "fault", "trainer.max_steps=240",
               "trainer.checkpoint_every=20", "trainer.max_failures=2", "bank.size=50", "bank.momentum=0.5",
               "trainer.keep_checkpoints=100", "data.max_dev_queries=20",
               f"loss.guide_model={tiny_model_dir}")  # GISTEmbed: its bank queue is saved and restored too
    run_dir = tmp_path / "fault"
    killed: list[tuple[int, int]] = []
    rng = random.Random(1234)

    def killer():
        deadline = time.time() + 900  # a hang guard, generous for a loaded machine
        seen: set[int] = set()
        baseline: int | None = -1  # kill once a checkpoint newer than this is registered
        while len(killed) < 2 and time.time() < deadline:
            steps = registered_steps(run_dir)  # the controller's (a folder on disk may not be registered yet)
            pids = [p for p in tagged_pids("RayTrainWorker", os.getpid()) if p not in seen]
            if len(pids) == 2 and baseline is None:
                # the restarted group is up: a checkpoint registered from now on is its own, so it
                # records this resume (killing before that would lose the resume from the history)
                baseline = max(steps, default=-1)
            if len(pids) == 2 and baseline is not None and max(steps, default=-1) > baseline:
                time.sleep(rng.uniform(0.0, 1.0))  # at a random step after that checkpoint
                victim = rng.choice(pids)
                try:
                    os.kill(victim, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                killed.append((victim, len(steps)))
                seen.update(pids)
                baseline = None
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    res = run_training(cfg)
    t.join(5)
    assert len(killed) == 2, f"only {len(killed)} worker(s) killed"
    history = json.loads((res.run_dir / "history.json").read_text())
    resumed = check_resumes(run_dir, history, 20)
    assert len(resumed) == 2 and resumed[0] < resumed[1] < 240
    assert all(h.get("guide_bank_checksum") for h in history if "resumed_from" in h)  # the guide's queue came back
    assert any("guide_masked_share" in h for h in history)
    assert res.metrics["steps"] == 240
    final = json.loads((res.final_dir / "negatron.json").read_text())
    assert final["step"] == 240
    assert final["metrics"]["data_digest"] == expected_data_digest(cfg, 240)
    assert "mrr@10" in res.metrics


def test_bad_input_fails_before_ray_work(tmp_path, tiny_model_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from negatron.trainers.schema import SchemaError

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"query": ["a"], "positive_id": ["x"]}), bad)
    cfg = load_config(None, [f"model.path={tiny_model_dir}", f"data.train={bad}", f"run.storage_path={tmp_path}"])
    with pytest.raises(SchemaError, match="missing column"):
        run_training(cfg)
    assert not (tmp_path / "negatron").exists()
