"""Checkpoints: full training state round trip, clear errors for corrupt files, no pickle."""

import pickle

import pytest
import torch

from negatron.cluster.config import load_config
from negatron.trainers.checkpoint import CheckpointError, load_training_state, read_meta, save_checkpoint
from negatron.trainers.encoder import Encoder
from negatron.trainers.loop import make_optimizer, run_worker
from negatron.trainers.step import ContrastiveModel
from tests.helpers import write_pairs


def _cfg(tmp_path, tiny_model_dir, *extra):
    train = write_pairs(tmp_path / "p.parquet", n=48)
    return load_config(None, [f"model.path={tiny_model_dir}", f"data.train={train}", "trainer.batch_size=8",
                              "model.max_length=32", "bank.size=20", "bank.momentum=0.9",
                              "loss.learnable_temperature=true", "optim.lr=1e-3", *extra])


def test_in_process_run_and_resume_equals_uninterrupted(tmp_path, tiny_model_dir):
    """8 steps straight == 4 steps, checkpoint, resume for 4 more (same bank, weights, optimizer)."""
    saved = {}

    def keep(metrics, d, tag=""):
        import shutil
        dst = tmp_path / f"ck{tag}{metrics['step']}"
        shutil.copytree(d, dst)
        saved[f"{tag}{metrics['step']}"] = dst

    cfg = _cfg(tmp_path, tiny_model_dir, "trainer.max_steps=8", "trainer.checkpoint_every=4")
    run_worker(cfg, 0, 1, keep, log=lambda s: None)
    straight, first = saved["8"], saved["4"]
    run_worker(cfg, 0, 1, lambda m, d: keep(m, d, "r"), resume_dir=str(first), log=lambda s: None)
    resumed = saved["r8"]
    assert read_meta(resumed)["step"] == 8
    a = Encoder.from_pretrained(str(straight)).state_dict()
    b = Encoder.from_pretrained(str(resumed)).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    ma, mb = read_meta(straight)["metrics"], read_meta(resumed)["metrics"]
    assert ma["bank_checksum"] == mb["bank_checksum"]
    assert ma["temperature"] == pytest.approx(mb["temperature"], abs=1e-6)


def _model_and_opt(tiny_model_dir, cfg):
    enc = Encoder.from_pretrained(str(tiny_model_dir))
    model = ContrastiveModel.from_config(enc, cfg)
    opt, sched = make_optimizer(model, cfg)
    return model, opt, sched


def test_corrupt_and_truncated_files_are_named(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, tiny_model_dir)
    model, opt, sched = _model_and_opt(tiny_model_dir, cfg)
    ck = save_checkpoint(tmp_path / "ck", model, opt, sched, 3, cfg.to_dict(), {}, [])
    bank = ck / "train_state" / "bank.safetensors"
    bank.write_bytes(bank.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="bank.safetensors: corrupt or truncated"):
        load_training_state(ck, *_model_and_opt(tiny_model_dir, cfg))
    (ck / "negatron.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="negatron.json: corrupt JSON"):
        load_training_state(ck, *_model_and_opt(tiny_model_dir, cfg))
    (ck / "negatron.json").unlink()
    with pytest.raises(CheckpointError, match="not a Negatron checkpoint"):
        read_meta(ck)


def test_a_warm_start_from_a_missing_checkpoint_is_named_before_ray_starts(tmp_path, tiny_model_dir):
    import ray

    from negatron.trainers.train import run_training

    cfg = _cfg(tmp_path, tiny_model_dir, f"run.storage_path={tmp_path / 'runs'}")
    with pytest.raises(CheckpointError, match="nowhere/negatron.json: missing"):
        run_training(cfg, init_checkpoint=str(tmp_path / "nowhere"))
    assert not ray.is_initialized()


def test_bank_size_mismatch_is_explained(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, tiny_model_dir)
    model, opt, sched = _model_and_opt(tiny_model_dir, cfg)
    ck = save_checkpoint(tmp_path / "ck", model, opt, sched, 3, cfg.to_dict(), {}, [])
    other = cfg.replace(["bank.size=30"])
    with pytest.raises(CheckpointError, match="bank.size"):
        load_training_state(ck, *_model_and_opt(tiny_model_dir, other))


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("touch /tmp/negatron-pwned",))


def test_malicious_pickle_is_refused(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, tiny_model_dir)
    model, opt, sched = _model_and_opt(tiny_model_dir, cfg)
    ck = save_checkpoint(tmp_path / "ck", model, opt, sched, 3, cfg.to_dict(), {}, [])
    with open(ck / "train_state" / "optimizer.pt", "wb") as f:
        pickle.dump({"optimizer": _Evil()}, f)
    with pytest.raises(CheckpointError, match="cannot load optimizer state safely"):
        load_training_state(ck, *_model_and_opt(tiny_model_dir, cfg))
    import os
    assert not os.path.exists("/tmp/negatron-pwned")


def test_warm_start_takes_mutated_temperature_and_lr(tmp_path, tiny_model_dir):
    """PBT's exploit: a donor checkpoint restored under a mutated config keeps the mutation."""
    saved = {}
    cfg = _cfg(tmp_path, tiny_model_dir, "trainer.max_steps=8", "trainer.checkpoint_every=4",
               "loss.temperature=0.05", "optim.lr=0.001")
    run_worker(cfg, 0, 1, lambda m, d: saved.setdefault(m["step"], m) or None, stop_at=4, log=lambda s: None)
    assert list(saved) == [4]  # stop_at ends the run early, with a checkpoint
    import shutil
    donor = tmp_path / "donor"
    run_worker(cfg, 0, 1, lambda m, d: shutil.copytree(d, donor) if m["step"] == 4 else None,
               stop_at=4, log=lambda s: None)
    mutated = cfg.replace(["loss.temperature=0.2", "optim.lr=0.0001"])
    got = {}
    run_worker(mutated, 0, 1, lambda m, d: got.setdefault(m["step"], m), resume_dir=str(donor),
               warm_start=True, log=lambda s: None)
    assert list(got) == [8]
    assert got[8]["temperature"] != pytest.approx(0.05, rel=1e-3)
    # learnable τ moves a little in 4 steps, but from 0.2, not from the donor's 0.05
    assert got[8]["temperature"] == pytest.approx(0.2, rel=0.05)


def test_a_run_resumed_at_its_last_step_reports_its_final_result_again(tmp_path, tiny_model_dir):
    """A run (or Tune trial) restarted after it finished resumes at its final checkpoint and
    reports that result once more, with the checkpoint, instead of reporting nothing."""
    import shutil

    final = tmp_path / "final"

    def keep(metrics, ckpt_dir):
        if metrics["step"] == 8:
            shutil.copytree(ckpt_dir, final)

    cfg = _cfg(tmp_path, tiny_model_dir, "trainer.max_steps=8", "trainer.checkpoint_every=4")
    done = run_worker(cfg, 0, 1, keep, log=lambda s: None)
    again = []
    out = run_worker(cfg, 0, 1, lambda m, d: again.append((m, d)), resume_dir=str(final), log=lambda s: None)
    assert len(again) == 1 and again[0][1] == str(final)
    assert again[0][0]["step"] == 8 and again[0][0]["loss"] == pytest.approx(done["loss"])
    assert out["bank_checksum"] == done["bank_checksum"]
