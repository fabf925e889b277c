"""GISTEmbed's guided false-negative masking (loss.guide_model) and Wang & Isola's alignment and
uniformity (dev metrics). Pure pieces, no Ray."""

import numpy as np
import pytest
import torch

from negatron.trainers.losses import info_nce
from negatron.trainers.metrics import alignment, uniformity


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)


def test_guide_masks_candidates_it_scores_above_the_positive():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pos = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    ids, scale = torch.tensor([1, 2]), torch.tensor(10.0)
    # the guide thinks query 0's in-batch candidate 1 (and bank key 0) beat its own positive
    gq = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    gpos = torch.tensor([[0.5, 0.866], [0.9, 0.436]])  # q0: pos 0.5, cand1 0.9 (masked); q1: pos 0.436, cand0 0.866 (masked)
    bank, gbank = _unit(3, 2, seed=1), torch.tensor([[0.95, 0.31], [0.0, 1.0], [-1.0, 0.0]])
    bank_ids = torch.tensor([7, 8, 9])
    got = info_nce(q, pos, ids, scale, bank_keys=bank, bank_ids=bank_ids, guide_q=gq, guide_pos_global=gpos,
                   guide_bank=gbank)
    ce = torch.nn.functional.cross_entropy
    # q0 keeps: its positive, bank keys 1 and 2 (guide 0.0, -1.0 < 0.5); masked: cand 1, bank key 0 (0.95)
    # q1 keeps: its positive, bank key 2 (guide 0.0 < 0.436 ... key 0: 0.31 < 0.436 kept; key 1: 1.0 masked)
    l0 = ce(torch.cat([q[0:1] @ pos[0:1].T, q[0:1] @ bank[1:].T], 1) * scale, torch.tensor([0]))
    l1 = ce(torch.cat([q[1:2] @ pos[1:2].T, q[1:2] @ bank[[0, 2]].T], 1) * scale, torch.tensor([0]))
    assert float(got) == pytest.approx(float((l0 + l1) / 2), abs=1e-6)
    # a margin masks more: with margin 0.5 q1's bank key 0 (0.31 > 0.436 − 0.5) goes too
    got_m = info_nce(q, pos, ids, scale, bank_keys=bank, bank_ids=bank_ids, guide_q=gq, guide_pos_global=gpos,
                     guide_bank=gbank, guide_margin=0.5)
    assert float(got_m) != pytest.approx(float(got), abs=1e-6)


def test_guide_never_masks_the_positive_and_reports_its_share():
    q, pos = _unit(4, 8, seed=2), _unit(4, 8, seed=3)
    ids, scale = torch.arange(4), torch.tensor(20.0)
    stats = {}  # a guide identical everywhere: every candidate ties the positive, and ties are kept
    got = info_nce(q, pos, ids, scale, guide_q=torch.ones(4, 8), guide_pos_global=torch.ones(4, 8), stats=stats)
    assert float(got) == pytest.approx(float(info_nce(q, pos, ids, scale)), abs=1e-6)  # ties are kept (strict >)
    assert float(stats["guide_masked"]) == 0.0
    # a guide that rates every other candidate above the positive masks them all: loss 0
    stats = {}
    gq, gp = torch.eye(4)[:, :4], 1.0 - torch.eye(4)
    got = info_nce(q, pos, ids, scale, guide_q=gq, guide_pos_global=gp, stats=stats)
    assert float(got) == pytest.approx(0.0, abs=1e-6) and float(stats["guide_masked"]) == pytest.approx(1.0)


def test_guided_step_keeps_a_guide_bank_slot_for_slot_and_cached_step_matches():
    from negatron.trainers.step import ContrastiveModel
    from tests.helpers import make_tiny_encoder

    texts = [f"def f{i}(x): return x * {i} + {i % 3}" for i in range(8)]
    batch = {"query": [f"multiply by {i}" for i in range(8)], "positive": texts, "pos_ids": torch.arange(8)}
    grads = []
    for mini in (0, 3):
        torch.manual_seed(0)
        guide = make_tiny_encoder(seed=5)
        model = ContrastiveModel(make_tiny_encoder(seed=0), bank_size=12, bank_momentum=0.9, guide=guide,
                                 guide_margin=0.05, mini_batch_size=mini)
        model.train(False)  # no dropout: the one-pass and the cached step must give the same gradients
        model.prefill_bank(texts[:4], torch.arange(100, 104))
        for step in range(2):
            model.encoder.zero_grad()
            loss, state = model.forward_backward(batch, step)
            model.after_step(state, step)
        assert not any(p.requires_grad for p in guide.parameters()) and not guide.training
        assert model.guide_bank.ids.tolist() == model.bank.ids.tolist()  # slot for slot
        want = model.guide.encode_batch(texts, role="document")  # 8×E, the positives in the guide's space
        slots = [i for i, d in enumerate(model.bank.ids.tolist()) if 0 <= d < 8]
        assert len(slots) >= 8  # both steps enqueued the same 8 positives (frozen guide: the same keys)
        torch.testing.assert_close(model.guide_bank.keys[slots], want[model.bank.ids[slots]], atol=1e-5, rtol=0)
        assert "guide_bank" in model.state_parts()
        grads.append([p.grad.clone() for p in model.encoder.parameters() if p.grad is not None])
        assert 0.0 <= float(state["guide_masked"]) <= 1.0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_guide_config_is_for_bi_encoders_and_refuses_a_cross_encoder(tmp_path):
    from negatron.cluster.config import ConfigError, load_config
    from negatron.trainers.tasks import _check_guide

    with pytest.raises(ConfigError, match="loss.guide_model"):
        load_config(None, ["model.kind=cross-encoder", "loss.guide_model=default", "bank.size=0"])
    ce = tmp_path / "ce"
    ce.mkdir()
    (ce / "config.json").write_text('{"architectures": ["BertForSequenceClassification"]}')
    (ce / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="cross-encoder"):
        _check_guide(str(ce))


def test_alignment_and_uniformity_match_their_definitions():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = x + 0.1 * rng.normal(size=x.shape)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    assert alignment(x, x) == 0.0
    assert alignment(x, y) == pytest.approx(np.mean(np.sum((x - y) ** 2, axis=1)))
    ref = np.log(np.mean([np.exp(-2 * np.sum((x[i] - x[j]) ** 2)) for i in range(50) for j in range(i + 1, 50)]))
    assert uniformity(x) == pytest.approx(ref, rel=1e-9)
    assert uniformity(np.repeat(x[:1], 5, axis=0)) == pytest.approx(0.0)  # collapsed: the worst value
    assert uniformity(x, max_rows=20) == uniformity(x, max_rows=20)  # seeded sample
    with pytest.raises(ValueError):
        alignment(x, y[:3])
    with pytest.raises(ValueError):
        uniformity(x[:1])


def test_dev_check_reports_alignment_and_uniformity(tmp_path):
    from negatron.trainers.evaluate import evaluate_encoder
    from negatron.trainers.stdlib_data import build_stdlib_dataset
    from tests.helpers import make_tiny_encoder

    build_stdlib_dataset(tmp_path)
    m = evaluate_encoder(make_tiny_encoder(seed=0), str(tmp_path / "dev"), max_queries=30, max_docs=80, progress=False)
    assert 0.0 <= m["alignment"] <= 4.0 and -4.0 <= m["uniformity"] <= 0.0
