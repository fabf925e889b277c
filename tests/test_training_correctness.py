"""Training correctness holes closed in hardening round two (pure, no Ray): query groups are never
negatives, mining never emits another positive of the query, hard negatives without ids are masked
when they are a positive's text, and the EMA key encoder follows the encoder's buffers."""

import numpy as np
import pyarrow as pa
import torch

from negatron.trainers.losses import info_nce, symmetric_term
from negatron.trainers.mine import mine
from tests.helpers import make_tiny_encoder


def _emb(n, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)


def test_another_positive_of_the_same_query_is_not_a_negative():
    q, p = _emb(4, seed=1), _emb(4, seed=2)
    pos_ids = torch.tensor([10, 11, 12, 13])
    qids = torch.tensor([1, 2, 1, 3])  # rows 0 and 2: two positives of one query
    scale = torch.tensor(10.0)
    got = info_nce(q, p, pos_ids, scale, query_ids_global=qids)
    # reference: row 0 and row 2 without each other's positive among the candidates
    ref = []
    for i, drop in ((0, 2), (1, None), (2, 0), (3, None)):
        cols = [j for j in range(4) if j != drop]
        logits = (q[i] @ p[cols].T) * scale
        ref.append(-torch.log_softmax(logits, 0)[cols.index(i)])
    assert torch.allclose(got, torch.stack(ref).mean(), atol=1e-6)
    assert not torch.allclose(got, info_nce(q, p, pos_ids, scale), atol=1e-4)  # it used to count them
    # the reverse direction masks the query's other rows too
    s = symmetric_term(p, q, pos_ids, scale, query_ids_global=qids)
    logits = (p[0] @ q[[0, 1, 3]].T) * scale
    assert torch.isfinite(s) and s > 0 and torch.log_softmax(logits, 0)[0] < 0


def test_bank_keys_of_the_same_query_are_masked():
    q, p, keys = _emb(2, seed=3), _emb(2, seed=4), _emb(5, seed=5)
    base = dict(pos_ids_global=torch.tensor([10, 11]), scale=torch.tensor(5.0), bank_keys=keys,
                bank_ids=torch.tensor([20, 21, 22, 23, 24]), bank_valid=torch.ones(5, dtype=torch.bool),
                query_ids_global=torch.tensor([1, 2]))
    masked = info_nce(q, p, bank_qids=torch.tensor([1, -1, -1, -1, -1]), **base)
    # by hand: both rows see both positives and the 5 keys, but row 0 (query group 1) not key 0
    ref = []
    for i in range(2):
        logits = torch.cat([q[i] @ p.T, q[i] @ keys.T]) * 5.0
        if i == 0:
            logits[2] = float("-inf")
        ref.append(-torch.log_softmax(logits, 0)[i])
    assert torch.allclose(masked, torch.stack(ref).mean(), atol=1e-6)


def test_pair_stream_carries_query_groups_and_ids_hard_negatives_by_positive_text():
    from negatron.trainers.data import PairStream, stable_id

    table = pa.table({"query": ["a", "a", "b"], "positive": ["pa1", "pa2", "pb"], "query_id": ["qa", "qa", "qb"],
                      "positive_id": ["da1", "da2", "db"], "negatives": [["pb", "zz"], ["pb"], ["pa1"]]})
    s = PairStream(table, batch_size=3, num_negatives=2)
    b = s.batch(0)
    order = list(b["rows"])
    qids = b["query_ids"].tolist()
    assert qids[order.index(0)] == qids[order.index(1)] == stable_id("qa")
    # a negative whose text is a positive's text takes that positive's id: masked where it is the answer
    neg = b["neg_ids"].view(3, 2)
    assert neg[order.index(2), 0] == stable_id("da1") and neg[order.index(0), 0] == stable_id("db")
    # any other text gets an id of its own, apart from every given id
    from negatron.trainers.data import text_ids
    from negatron.trainers.ingest import hash_ids

    assert neg[order.index(0), 1] == text_ids(hash_ids(["zz"]))[0] != stable_id("zz")
    assert b["neg_valid"].view(3, 2).tolist()[order.index(1)] == [True, False]


def test_mining_never_emits_another_positive_of_the_query(tmp_path):
    import pyarrow.parquet as pq

    n = 30
    queries = [f"what does helper {i // 2} compute" for i in range(n)]
    table = pa.table({"query": queries, "positive": [f"def helper_{i}(x): return x + {i}" for i in range(n)],
                      "query_id": [f"q{i // 2}" for i in range(n)],  # every query has two positives
                      "positive_id": [f"d{i}" for i in range(n)]})
    pq.write_table(table, tmp_path / "pairs.parquet")
    enc = make_tiny_encoder()
    mine("default", tmp_path / "pairs.parquet", tmp_path / "mined.parquet", k=n, skip=0, take=n,
         embed=lambda texts, desc: enc.encode(texts))
    rows = pq.read_table(tmp_path / "mined.parquet").to_pylist()
    by_query = {}
    for r in rows:
        by_query.setdefault(r["query_id"], set()).add(r["positive_id"])
    for r in rows:
        assert not by_query[r["query_id"]] & set(r["negative_ids"]), r
        assert r["negative_ids"]  # the other queries' positives are still there


def test_momentum_key_encoder_follows_buffers_too():
    from negatron.trainers.step import ContrastiveModel

    enc = make_tiny_encoder()
    enc.register_buffer("running_stat", torch.zeros(3))
    model = ContrastiveModel(enc, bank_size=4, bank_momentum=0.5)
    model.encoder.running_stat.fill_(2.0)
    ids = torch.tensor([1, 2])
    _, state = model.loss({"query": ["a b", "c d"], "positive": ["e f", "g h"], "pos_ids": ids}, step=0)
    model.after_step(state, 0)
    assert torch.allclose(model.key_encoder.running_stat, torch.full((3,), 1.0))  # 0.5·0 + 0.5·2
    for bk, bq in zip(model.key_encoder.buffers(), model.encoder.buffers()):
        if not bk.is_floating_point():
            assert torch.equal(bk, bq)
