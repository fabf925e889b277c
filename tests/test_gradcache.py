"""The cached contrastive step (trainer.mini_batch_size) gives the gradients of one pass. No Ray;
two workers against one big batch are in test_distributed_equivalence.py."""

import pytest
import torch

from negatron.trainers.rerank_step import CrossEncoderModel
from negatron.trainers.step import ContrastiveModel
from tests.helpers import make_tiny_encoder

B = 8


def _batch(negatives: bool = True):
    g = {"query": [f"what does helper {i} compute for {i % 3}" for i in range(B)],
         "positive": [f"def helper_{i}(x):\n    return x * {i}" + " + 1" * (i % 4) for i in range(B)],
         "pos_ids": torch.arange(B), "query_ids": torch.arange(100, 100 + B)}
    g["pos_ids"][5] = g["pos_ids"][1]  # a duplicate positive: never a negative of its twin
    if negatives:
        g["negatives"] = [f"def other_{i}(y):\n    return y - {i}" for i in range(2 * B)]  # H = 2
        g["neg_ids"] = torch.arange(1000, 1000 + 2 * B)
        g["neg_valid"] = torch.ones(2 * B, dtype=torch.bool)
        g["neg_valid"][3] = False
    return g


def _grads(model, batch, train: bool, seed: int = 5):
    model.train(train)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss, state = model.forward_backward(batch, step=0)
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, state


def _models(mini, **kwargs):
    state = make_tiny_encoder(seed=0).state_dict()
    if "guide_margin" in kwargs:  # GISTEmbed: one frozen guide for both
        kwargs["guide"] = make_tiny_encoder(seed=7)
    out = []
    for m in (0, mini):
        enc = make_tiny_encoder(seed=0)
        enc.load_state_dict(state)
        out.append(ContrastiveModel(enc, mini_batch_size=m, **kwargs))
    return out


@pytest.mark.parametrize("kwargs", [
    dict(temperature=0.1),
    dict(temperature=0.1, bank_size=12, bank_momentum=0.9, bank_mode="moco", symmetric=True, learnable_temperature=True),
    dict(temperature=0.1, bank_size=12, bank_mode="joint"),
    dict(temperature=0.1, bank_size=12, bank_momentum=0.9, guide_margin=0.02),
], ids=["in-batch", "moco-symmetric-learnable", "joint-bank", "gist-guide"])
def test_cached_step_equals_one_pass(kwargs):
    """Mini-batches of 3 (uneven: 3+3+2, negatives 3×5+1) without dropout: the same loss, the same
    gradients for every parameter (τ included), the same state for the bank."""
    plain, cached = _models(3, **kwargs)
    batch = _batch()
    for model in (plain, cached):
        if model.bank is not None:  # a bank with keys in it, so its term counts
            model.prefill_bank([f"def bank_{i}(): pass" for i in range(12)], torch.arange(500, 512))
    l0, g0, s0 = _grads(plain, batch, train=False)
    l1, g1, s1 = _grads(cached, batch, train=False)
    assert l1 == pytest.approx(l0, abs=1e-6)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-5, rtol=1e-5, msg=name)
    torch.testing.assert_close(s1["p_all"], s0["p_all"], atol=1e-6, rtol=1e-5)


def test_dropout_is_replayed():
    """With dropout on and one mini-batch as large as the batch, the cached step consumes the
    random state as one pass does; replaying it in the second forward gives exactly one pass's
    gradients (without the replay they would differ)."""
    plain, cached = _models(B, temperature=0.1)
    batch = _batch(negatives=False)
    l0, g0, _ = _grads(plain, batch, train=True)
    l1, g1, _ = _grads(cached, batch, train=True)
    assert l1 == pytest.approx(l0, abs=1e-6)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-5, rtol=1e-5, msg=name)
    # and the dropout really differed from eval mode
    _, g_eval, _ = _grads(plain, batch, train=False)
    assert any(not torch.allclose(g_eval[n], g0[n]) for n in g0)


def test_cross_encoder_listwise_cached_equals_one_pass(tmp_path):
    from negatron.trainers.cross_encoder import CrossEncoder
    from tests.helpers import make_tiny_cross_encoder

    folder = make_tiny_cross_encoder(tmp_path / "ce")
    models = [CrossEncoderModel(CrossEncoder.from_pretrained(folder), temperature=0.5, in_batch_negatives=2,
                                learnable_temperature=True, mini_batch_size=m) for m in (0, 5)]
    batch = _batch()
    (l0, g0, _), (l1, g1, _) = (_grads(m, batch, train=False) for m in models)
    assert l1 == pytest.approx(l0, abs=1e-6)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-5, rtol=1e-5, msg=name)
