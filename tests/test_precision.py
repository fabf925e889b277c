"""trainer.precision (bf16 / fp16 autocast, fp32 everywhere else), the fp16 gradient scaler in
checkpoints, and model.gradient_checkpointing (the same loss and gradients). No Ray."""

import shutil

import pytest
import torch

from negatron.cluster.config import ConfigError, load_config
from negatron.trainers.checkpoint import read_meta
from negatron.trainers.encoder import Encoder
from negatron.trainers.loop import run_worker
from negatron.trainers.precision import set_precision
from negatron.trainers.step import ContrastiveModel
from tests.helpers import make_tiny_cross_encoder, make_tiny_encoder, write_pairs

TEXTS = [f"def f{i}(x):\n    return x * {i} + {i % 3}  # helper number {i}" for i in range(8)]


def _batch():
    return {"query": [f"what does f{i} return" for i in range(8)], "positive": TEXTS,
            "pos_ids": torch.arange(8), "query_ids": torch.arange(100, 108)}


def _loss_and_grads(model):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # dropout: the same masks in every run
    loss, _ = model.loss(_batch(), step=0)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.trainable_parameters() if p.grad is not None]


def test_bf16_autocasts_the_transformer_only(tiny_model_dir):
    enc = Encoder.from_pretrained(str(tiny_model_dir))
    model = ContrastiveModel(enc, temperature=0.1, bank_size=16, bank_momentum=0.9)
    model.train()
    full, g_full = _loss_and_grads(model)
    set_precision(model, "bf16")
    assert model.key_encoder.autocast_dtype is torch.bfloat16  # the momentum copy too
    half, g_half = _loss_and_grads(model)
    assert half.dtype == torch.float32 and enc.encode(TEXTS[:2]).dtype.name == "float32"  # fp32 out of the encoder
    assert half == pytest.approx(float(full), rel=0.05) and half != full  # bf16 really ran
    cos = torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in g_full]),
                                                torch.cat([g.flatten() for g in g_half]), dim=0)
    assert cos > 0.95


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    enc = make_tiny_encoder(seed=0)
    model = ContrastiveModel(enc, temperature=0.1)
    model.train()  # with dropout: the recomputed forward must replay the same masks
    loss, grads = _loss_and_grads(model)
    enc.enable_gradient_checkpointing()
    assert enc.backbone.is_activation_checkpointing
    loss2, grads2 = _loss_and_grads(model)
    assert float(loss2) == pytest.approx(float(loss), abs=1e-6)
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_cross_encoder_checkpointing_and_bf16(tmp_path):
    from negatron.trainers.cross_encoder import CrossEncoder

    ce = CrossEncoder.from_pretrained(make_tiny_cross_encoder(tmp_path / "ce"))
    ce.train()
    torch.manual_seed(3)
    a = ce.logits(["q one", "q two"], TEXTS[:2])
    ce.enable_gradient_checkpointing()
    torch.manual_seed(3)
    b = ce.logits(["q one", "q two"], TEXTS[:2])
    torch.testing.assert_close(a, b)
    set_precision(ce, "bf16")
    c = ce.logits(["q one", "q two"], TEXTS[:2])
    assert c.dtype == torch.float32 and torch.allclose(a, c, atol=0.1)


def _cfg(tmp_path, model_dir, *extra):
    train = write_pairs(tmp_path / "p.parquet", n=48)
    return load_config(None, [f"model.path={model_dir}", f"data.train={train}", "trainer.batch_size=8",
                              "model.max_length=32", "bank.size=20", "bank.momentum=0.9", "optim.lr=1e-3", *extra])


def test_fp16_runs_with_a_checkpointed_gradient_scaler(tmp_path, tiny_model_dir):
    """fp16 on CPU: the loss scale is saved with the optimizer, and a resumed run ends where an
    uninterrupted one does."""
    saved = {}

    def keep(metrics, d, tag=""):
        dst = tmp_path / f"ck{tag}{metrics['step']}"
        shutil.copytree(d, dst)
        saved[f"{tag}{metrics['step']}"] = dst

    cfg = _cfg(tmp_path, tiny_model_dir, "trainer.precision=fp16", "trainer.max_steps=6", "trainer.checkpoint_every=3",
               "model.gradient_checkpointing=true")
    run_worker(cfg, 0, 1, keep, log=lambda s: None)
    opt = torch.load(saved["3"] / "train_state" / "optimizer.pt", weights_only=True)
    assert opt["scaler"] and opt["scaler"]["scale"] > 0
    run_worker(cfg, 0, 1, lambda m, d: keep(m, d, "r"), resume_dir=str(saved["3"]), log=lambda s: None)
    a = Encoder.from_pretrained(str(saved["6"])).state_dict()
    b = Encoder.from_pretrained(str(saved["r6"])).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    assert read_meta(saved["6"])["metrics"]["bank_checksum"] == read_meta(saved["r6"])["metrics"]["bank_checksum"]


def test_image_kind_refuses_reduced_precision(tmp_path):
    from negatron.trainers.tasks import task_for

    cfg = load_config(None, ["model.kind=image", "model.path=cnn", "trainer.precision=bf16",
                             f"data.train={tmp_path / 'none.parquet'}"])
    with pytest.raises(ConfigError, match="image CNN trains in fp32"):
        task_for(cfg).validate(cfg)
