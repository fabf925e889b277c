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
                 embed=lambda texts, desc: enc.encode(texts), with_texts=True)
    table = check_pairs(tmp_path / "mined.parquet")  # the trainer's own schema check
    assert table.num_rows == 40 and stats["negatives_per_query_mean"] == 4
    rows = table.to_pylist()
    for r in rows:
        assert r["positive_id"] not in r["negative_ids"] and r["positive"] not in r["negatives"]
        assert len(r["negatives"]) == len(r["negative_ids"]) == 4


def test_mined_ids_only_are_looked_up_by_the_trainer_stream(tmp_path):
    """By default mining writes ids only (the file stays near its input's size); the stream joins the
    texts from data.negatives_corpus, the same texts the inline column would have held."""
    import pyarrow.parquet as pq

    from negatron.trainers.data import PairStream
    from negatron.trainers.ingest import ParquetSource
    from negatron.trainers.lookup import TextLookup

    data = write_pairs(tmp_path / "pairs.parquet", n=40)
    enc = make_tiny_encoder()
    emb = lambda texts, desc: enc.encode(texts)  # noqa: E731
    inline = mine("default", data, tmp_path / "inline.parquet", k=10, skip=1, take=4, embed=emb, with_texts=True)
    ids = mine("default", data, tmp_path / "ids.parquet", k=10, skip=1, take=4, embed=emb)
    assert ids["negatives_corpus"] == str(tmp_path / "ids.negatives.parquet") and inline["corpus"] == ids["corpus"] == 40
    t_ids = pq.read_table(tmp_path / "ids.parquet")
    assert "negatives" not in t_ids.column_names
    assert t_ids.column("negative_ids").to_pylist() == pq.read_table(tmp_path / "inline.parquet").column("negative_ids").to_pylist()
    lookup = TextLookup(ids["negatives_corpus"])
    a = PairStream(ParquetSource(str(tmp_path / "inline.parquet")), 8, num_negatives=3).batch(2)
    b = PairStream(ParquetSource(str(tmp_path / "ids.parquet")), 8, num_negatives=3, lookup=lookup).batch(2)
    assert a["negatives"] == b["negatives"] and torch.equal(a["neg_ids"], b["neg_ids"])
    assert torch.equal(a["neg_valid"], b["neg_valid"]) and b["neg_valid"].any()


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


def test_build_groups_adds_in_batch_negatives_and_can_hold_back_hard_ones():
    batch = {"query": ["q0", "q1", "q2"], "positive": ["p0", "p1", "p2"], "pos_ids": torch.tensor([10, 11, 10]),
             "negatives": ["n0", "n1", "n2"], "neg_valid": torch.tensor([True, True, True])}
    q, t, mask = build_groups(batch, in_batch=1)
    # row 0: next rows cyclically, skipping row 2 (same id 10) -> p1; row 2 skips row 0 -> p1
    assert t == ["p0", "n0", "p1", "p1", "n1", "p2", "p2", "n2", "p1"] and mask.all()
    q, t, mask = build_groups(batch, in_batch=1, hard=False)  # the warm-up phase: in-batch only
    assert "n0" not in t and "n1" not in t and "n2" not in t
    assert t[:2] == ["p0", "p1"] and t[3:6] == ["p1", "p2", "p0"]
    assert mask.tolist() == [[True, True, False], [True, True, True], [True, True, False]]


def test_fuse_scores_interpolates_between_the_two_orders():
    from negatron.trainers.evaluate import fuse_scores

    first = np.array([0.9, 0.8, 0.1])  # bi-encoder: 0 > 1 > 2
    second = np.array([-2.0, 5.0, 1.0])  # reranker: 1 > 2 > 0
    assert list(np.argsort(-fuse_scores(first, second, 1.0))) == [1, 2, 0]
    assert list(np.argsort(-fuse_scores(first, second, 0.0))) == [0, 1, 2]
    assert list(np.argsort(-fuse_scores(first, second, 0.5))) == [1, 0, 2]
    # z-scores: shifting or scaling either stage's scores changes nothing
    np.testing.assert_allclose(fuse_scores(first, second, 0.3), fuse_scores(first * 10 + 3, second / 7 - 1, 0.3))
    assert np.all(fuse_scores(np.ones(3), np.ones(3), 0.5) == 0)  # constant lists: no NaN
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fuse_scores(first, second, 1.5)


def test_weight_zero_keeps_the_first_stage_and_choose_weight_reports_a_curve(tmp_path):
    from negatron.trainers.cross_encoder import CrossEncoder
    from negatron.trainers.evaluate import RerankEval, evaluate_two_stage

    task = write_synthetic_task(tmp_path / "task")
    enc, ce = make_tiny_encoder(), CrossEncoder.from_pretrained(make_tiny_cross_encoder(tmp_path / "ce"))
    out = evaluate_two_stage(enc, ce, str(task / "dev"), depth=10, progress=False, weights=(1.0, 0.0))
    assert out["reranked@w=0"]["rerank_weight"] == 0.0
    for k in ("recall@1", "mrr@10", "ndcg@10"):
        assert out["reranked@w=0"][k] == pytest.approx(out["retrieval"][k])
    ev = RerankEval(enc, str(task / "dev"), depth=10)
    w, curve = ev.choose_weight(ce, grid=(0.0, 0.5, 1.0))
    assert set(curve) == {0.0, 0.5, 1.0} and curve[w] == max(curve.values())
    assert curve[0.0] == pytest.approx(out["retrieval"]["mrr@10"])


def test_cross_encoder_head_gets_its_own_learning_rate_through_a_pbt_update(tmp_path):
    from negatron.cluster.config import load_config
    from negatron.trainers.cross_encoder import CrossEncoder
    from negatron.trainers.loop import _apply_hparams, make_optimizer
    from negatron.trainers.rerank_step import CrossEncoderModel

    ce = CrossEncoder.for_training(str(make_tiny_cross_encoder(tmp_path / "ce")), max_length=32)
    cfg = load_config(None, ["model.kind=cross-encoder", "bank.size=0", "optim.lr=1e-4", "optim.head_lr=2e-3",
                             "optim.warmup_steps=0"])
    model = CrossEncoderModel.from_config(ce, cfg)
    opt, sched = make_optimizer(model, cfg)
    head_ids = {id(p) for n, p in ce.named_parameters() if "classifier" in n or "pooler" in n}
    for g in opt.param_groups:
        assert all((id(p) in head_ids) == g["head"] for p in g["params"])
        assert g["lr"] == pytest.approx(2e-3 if g["head"] else 1e-4)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(ce.parameters()))
    _apply_hparams(cfg.replace({"optim.lr": 5e-5, "optim.head_lr": 1e-3}), model, opt, sched)
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx([5e-5, 1e-3])
    plain = make_optimizer(model, cfg.replace({"optim.head_lr": 0.0}))[0]
    assert {g["lr"] for g in plain.param_groups} == {1e-4} and not any(g["head"] for g in plain.param_groups)


def test_reranked_search_order_uses_the_fusion_weight():
    from negatron.serve.api import rerank_order, sigmoid
    from negatron.trainers.evaluate import fuse_scores

    retrieval = [0.9, 0.8, 0.7, 0.1]
    logits = np.array([-1.4, 2.2, 0.4, 2.9])  # what the Reranker deployment returns
    final, order = rerank_order(retrieval, logits, 1.0, 3)
    assert list(order) == [3, 1, 2] and np.allclose(final, 1 / (1 + np.exp(-logits)))  # the reranker alone
    assert list(rerank_order(retrieval, logits, 0.0, 4)[1]) == [0, 1, 2, 3]  # the retrieval order
    final, order = rerank_order(retrieval, logits, 0.5, 4)
    np.testing.assert_allclose(final, fuse_scores(np.array(retrieval), logits, 0.5))
    assert list(order) == list(np.argsort(-final, kind="stable"))
    # saturated logits: their probabilities round to 1.0 and 0.0, the logits still order them
    big = np.array([40.0, 41.0, -41.0, -40.0])
    final, order = rerank_order(retrieval, big, 1.0, 4)
    assert list(order) == [1, 0, 3, 2] and np.isfinite(final).all() and final[0] == final[1] == 1.0
    assert np.isfinite(rerank_order(retrieval, big, 0.5, 4)[0]).all()
    assert np.isfinite(sigmoid(np.array([-1000.0, 1000.0]))).all()


def test_saved_rerank_weight_is_read_validated_and_used_by_serve(tmp_path):
    import json

    from negatron.cluster.config import ConfigError, load_config
    from negatron.serve.app import _rerank_weight
    from negatron.trainers.cross_encoder import RERANK_FILE, saved_rerank_weight

    ce = make_tiny_cross_encoder(tmp_path / "run" / "final")
    serve = load_config(None, []).serve
    assert saved_rerank_weight(ce) is None and _rerank_weight(serve, str(ce)) == 1.0
    (ce / RERANK_FILE).write_text(json.dumps({"rerank_weight": 0.4}))
    assert saved_rerank_weight(ce) == 0.4 and saved_rerank_weight(tmp_path / "run") == 0.4  # run folder too
    assert _rerank_weight(serve, str(ce)) == 0.4
    assert _rerank_weight(load_config(None, ["serve.retriever.rerank_weight=0.7"]).serve, str(ce)) == 0.7
    assert _rerank_weight(serve, "") == 1.0  # no reranker
    (ce / RERANK_FILE).write_text(json.dumps({"rerank_weight": 3}))
    with pytest.raises(ConfigError, match=r"negatron_rerank.json: rerank_weight must be in \[0, 1\], got 3"):
        _rerank_weight(serve, str(ce))
    (ce / RERANK_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="negatron_rerank.json: unreadable rerank_weight"):
        saved_rerank_weight(ce)


def test_eval_cli_fuses_with_the_saved_weight_and_refuses_a_bad_one(tmp_path, capsys):
    import json

    from negatron.cluster.cli import main
    from negatron.trainers.cross_encoder import RERANK_FILE

    task = write_synthetic_task(tmp_path / "task")
    make_tiny_encoder().save(tmp_path / "bi")
    ce = make_tiny_cross_encoder(tmp_path / "ce")
    base = ["eval", "--model", str(tmp_path / "bi"), "--data", str(task / "dev"), "--reranker", str(ce),
            "--rerank-depth", "10"]
    assert main(base + ["--rerank-weight", "3"]) == 2
    assert "--rerank-weight must be in [0, 1], got 3" in capsys.readouterr().err
    (ce / RERANK_FILE).write_text(json.dumps({"rerank_weight": 0.0}))
    assert main(base + ["--out", str(tmp_path / "two.json")]) == 0
    assert f"weight 0 ({ce}/{RERANK_FILE})" in capsys.readouterr().out
    out = json.loads((tmp_path / "two.json").read_text())
    assert out["reranked"]["rerank_weight"] == 0.0
    assert out["reranked"]["mrr@10"] == pytest.approx(out["retrieval"]["mrr@10"])  # weight 0 = first stage
    (ce / RERANK_FILE).write_text("[]")
    assert main(base) == 2 and "unreadable rerank_weight" in capsys.readouterr().err
