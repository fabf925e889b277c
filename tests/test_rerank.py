"""Hard-negative mining, the listwise reranker loss and two-stage evaluation: no Ray."""

import numpy as np
import pytest
import torch

from negatron.trainers.mine import mine, select_negatives
from negatron.trainers.rerank_step import build_groups, listwise_loss
from negatron.trainers.schema import check_pairs
from tests.helpers import make_tiny_cross_encoder, make_tiny_encoder, write_pairs, write_synthetic_task


def test_select_negatives_skips_positive_and_same_id_and_applies_window_and_margin():
    doc_ids = ["a", "b", "a", "c", "d", "e"]  # rows 0 and 2 share the id "a"
    rows = np.array([[0, 2, 1, 3, 4, 5, -1]])
    scores = np.array([[0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.0]])
    picked = select_negatives(["a"], np.array([0.9]), rows, scores, doc_ids, skip=0, take=10, margin=None)
    assert picked == [[1, 3, 4, 5]]  # no "a" (the positive or its duplicate), no -1
    assert select_negatives(["a"], np.array([0.9]), rows, scores, doc_ids, skip=1, take=2, margin=None) == [[3, 4]]
    # margin: drop anything within 0.15 of the positive's score (0.8 and 0.7... 0.8 > 0.75)
    assert select_negatives(["a"], np.array([0.9]), rows, scores, doc_ids, skip=0, take=10, margin=0.15) == [[3, 4, 5]]
    texts = ["p", "x", "p2", "p", "y", "z"]  # row 3 has the positive's text under another id
    got = select_negatives(["a"], np.array([0.9]), rows, scores, doc_ids, 0, 10, None, texts, ["p"])
    assert got == [[1, 4, 5]]


def test_mine_writes_negatives_the_trainer_accepts(tmp_path):
    data = write_pairs(tmp_path / "pairs.parquet", n=40)
    enc = make_tiny_encoder()
    enc.save(tmp_path / "m")
    stats = mine(str(tmp_path / "m"), data, tmp_path / "mined.parquet", k=10, skip=1, take=4,
                 embed=lambda texts, desc: enc.encode(texts))
    table = check_pairs(tmp_path / "mined.parquet")  # the trainer's own schema check
    assert table.num_rows == 40 and stats["negatives_per_query_mean"] == 4
    rows = table.to_pylist()
    for r in rows:
        assert r["positive_id"] not in r["negative_ids"] and r["positive"] not in r["negatives"]
        assert len(r["negatives"]) == len(r["negative_ids"]) == 4


def test_listwise_loss_matches_manual_softmax():
    scores = torch.tensor([[2.0, 1.0, 0.5], [0.3, 0.9, -1.0]], requires_grad=True)
    valid = torch.tensor([[True, True, True], [True, True, False]])
    scale = torch.tensor(2.0)
    got = listwise_loss(scores, valid, scale)
    s0 = torch.log_softmax(scores[0] * 2, 0)[0]
    s1 = torch.log_softmax(scores[1, :2] * 2, 0)[0]
    assert torch.allclose(got, -(s0 + s1) / 2)
    got.backward()
    assert scores.grad[1, 2] == 0  # a padded slot gets no gradient


def test_build_groups_uses_hard_negatives_or_borrows_in_batch():
    batch = {"query": ["q0", "q1"], "positive": ["p0", "p1"], "pos_ids": torch.tensor([10, 11]),
             "negatives": ["n0", "", "n1a", "n1b"], "neg_valid": torch.tensor([True, False, True, True])}
    q, t, mask = build_groups(batch)
    assert mask.tolist() == [[True, True, False], [True, True, True]]
    assert t[:2] == ["p0", "n0"] and t[3:] == ["p1", "n1a", "n1b"] and q[3:] == ["q1"] * 3
    q, t, mask = build_groups({"query": ["q0", "q1"], "positive": ["p0", "p1"], "pos_ids": torch.tensor([10, 11])})
    assert t == ["p0", "p1", "p1", "p0"] and mask.all()


def test_two_stage_eval_returns_both_metric_sets(tmp_path):
    from negatron.trainers.cross_encoder import CrossEncoder
    from negatron.trainers.evaluate import evaluate_two_stage

    task = write_synthetic_task(tmp_path / "task")
    out = evaluate_two_stage(make_tiny_encoder(), CrossEncoder.from_pretrained(make_tiny_cross_encoder(tmp_path / "ce")),
                             str(task / "dev"), depth=10, progress=False)
    for stage in ("retrieval", "reranked"):
        for k in ("recall@1", "recall@10", "recall@100", "mrr@10", "ndcg@10"):
            assert 0.0 <= out[stage][k] <= 1.0
    assert out["reranked"]["rerank_depth"] == 10
    # reordering the top 10 cannot change Recall@10 or Recall@100
    assert out["reranked"]["recall@10"] == pytest.approx(out["retrieval"]["recall@10"])
    assert out["reranked"]["recall@100"] == pytest.approx(out["retrieval"]["recall@100"])
