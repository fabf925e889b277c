import json
import math
import os
import random
import subprocess
import sys

import pytest

from negatron.trainers.metrics import evaluate_run, mrr_at_k, ndcg_at_k, recall_at_k


def test_hand_computed():
    rel = {"a": 1.0}
    assert mrr_at_k(["x", "a", "y"], rel, 10) == 0.5
    assert mrr_at_k(["x", "y"], rel, 10) == 0.0
    assert mrr_at_k(["x"] * 10 + ["a"], rel, 10) == 0.0  # rank 11 is outside @10
    assert recall_at_k(["x", "a"], rel, 1) == 0.0
    assert recall_at_k(["x", "a"], rel, 2) == 1.0
    # two relevant docs, one found in top 2
    assert recall_at_k(["a", "x", "b"], {"a": 1, "b": 1}, 2) == 0.5
    # nDCG: relevant at rank 2 -> (1/log2(3)) / 1
    assert ndcg_at_k(["x", "a"], rel, 10) == pytest.approx(1 / math.log2(3))
    # graded: ideal order b(2), a(1); run a, b
    got = ndcg_at_k(["a", "b"], {"a": 1, "b": 2}, 10)
    ideal = 2 + 1 / math.log2(3)
    assert got == pytest.approx((1 + 2 / math.log2(3)) / ideal)


def test_evaluate_run_averages_and_ignores_unjudged():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}, "q3": {"c": 0}}  # q3 has no relevant doc: skipped
    run = {"q1": ["a", "x"], "q2": ["x", "y", "b"]}
    m = evaluate_run(run, qrels)
    assert m["num_queries"] == 2
    assert m["mrr@10"] == pytest.approx((1 + 1 / 3) / 2)
    assert m["recall@1"] == pytest.approx(0.5)
    assert m["recall@10"] == 1.0
    with pytest.raises(ValueError):
        evaluate_run(run, {"q": {"a": 0}})


RANX = """
import json, sys
import ranx
qrels, run, metrics = json.load(sys.stdin)
r_run = ranx.Run({q: {d: float(len(r) - i) for i, d in enumerate(r)} for q, r in run.items()})
print(json.dumps({k: float(v) for k, v in ranx.evaluate(ranx.Qrels(qrels), r_run, metrics).items()}))
"""


def test_against_ranx_on_random_runs():
    pytest.importorskip("ranx")
    rng = random.Random(0)
    docs = [f"d{i}" for i in range(300)]
    qrels, run = {}, {}
    for q in range(60):
        rel = rng.sample(docs, rng.randint(1, 4))
        qrels[f"q{q}"] = {d: rng.choice([1, 2, 3]) for d in rel}
        ranked = rng.sample(docs, 150)
        # make some relevant docs appear high
        if rng.random() < 0.6:
            ranked.insert(rng.randint(0, 12), rel[0])
            ranked = list(dict.fromkeys(ranked))
        run[f"q{q}"] = ranked
    ours = evaluate_run(run, qrels)
    names = ["recall@1", "recall@10", "recall@100", "mrr@10", "ndcg@10"]
    # ranx's own code, run by the interpreter instead of compiled by numba first (~60 s on a clean
    # machine, for the same arithmetic)
    r = subprocess.run([sys.executable, "-c", RANX], input=json.dumps([qrels, run, names]), capture_output=True,
                       text=True, env={**os.environ, "NUMBA_DISABLE_JIT": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    theirs = json.loads(r.stdout.strip().splitlines()[-1])
    for k in names:
        assert ours[k] == pytest.approx(theirs[k], abs=1e-9), k
