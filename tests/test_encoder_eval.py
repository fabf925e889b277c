import json
import subprocess
import sys

import numpy as np
import pytest

from negatron.trainers.encoder import Encoder, ModelLoadError, resolve_model_path
from negatron.trainers.evaluate import evaluate_encoder, exact_search
from tests.helpers import make_tiny_encoder


def test_exact_search_matches_numpy():
    rng = np.random.default_rng(0)
    c = rng.standard_normal((50, 8)).astype("float32")
    q = rng.standard_normal((5, 8)).astype("float32")
    scores, idx = exact_search(c, q, 7)
    ref = np.argsort(-(q @ c.T), axis=1)[:, :7]
    assert (idx == ref).all()
    with pytest.raises(ValueError, match="shapes"):
        exact_search(c, q[:, :4], 3)


@pytest.mark.parametrize("pooling, proj", [("mean", 0), ("cls", 16)])
def test_save_load_round_trip_transformers_and_st(tmp_path, pooling, proj):
    enc = make_tiny_encoder(pooling=pooling, projection_dim=proj)
    enc.save(tmp_path / "m")
    texts = ["def f(x): return x", "sort a list of numbers in place", "hello"]
    ours = enc.encode(texts)
    back = Encoder.from_pretrained(str(tmp_path / "m"))
    assert back.pooling == pooling and back.dim == enc.dim
    np.testing.assert_allclose(back.encode(texts), ours, atol=1e-6)
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(tmp_path / "m"), device="cpu")
    np.testing.assert_allclose(model.encode(texts, convert_to_numpy=True), ours, atol=1e-5)
    from transformers import AutoModel
    AutoModel.from_pretrained(tmp_path / "m")  # plain transformers loads the backbone


def test_model_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="model folder not found"):
        resolve_model_path(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model_path(str(tmp_path / "empty"))
    assert (resolve_model_path("default") / "model.safetensors").is_file()


def test_evaluate_tiny_model_on_stdlib(stdlib_data, tiny_model_dir):
    enc = Encoder.from_pretrained(str(tiny_model_dir))
    m = evaluate_encoder(enc, str(stdlib_data / "dev"), max_queries=50, progress=False)
    for k in ["recall@1", "recall@10", "recall@100", "mrr@10", "ndcg@10"]:
        assert 0.0 <= m[k] <= 1.0
    assert m["num_queries"] == 50
    assert m["recall@1"] <= m["recall@10"] <= m["recall@100"]


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "negatron.cluster.cli", *args], capture_output=True, text=True, **kw)


def test_cli_eval_writes_json(stdlib_data, tiny_model_dir, tmp_path):
    out = tmp_path / "m.json"
    r = _cli("eval", "--model", str(tiny_model_dir), "--data", str(stdlib_data / "dev"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    m = json.loads(out.read_text())
    assert set(["recall@1", "recall@10", "recall@100", "mrr@10", "ndcg@10"]) <= set(m)
    assert "mrr@10" in r.stdout


def test_cli_errors_are_one_line(tmp_path, tiny_model_dir):
    r = _cli("eval", "--model", str(tiny_model_dir), "--data", str(tmp_path / "nope"))
    assert r.returncode == 2
    assert r.stderr.strip().startswith("negatron: error:") and "eval folder not found" in r.stderr
    assert "Traceback" not in r.stderr
    (tmp_path / "ev").mkdir()
    import pyarrow as pa, pyarrow.parquet as pq
    pq.write_table(pa.table({"query_id": ["q"], "txt": ["x"]}), tmp_path / "ev" / "queries.parquet")
    r = _cli("eval", "--model", "default", "--data", str(tmp_path / "ev"))
    assert r.returncode == 2 and "queries.parquet" in r.stderr and "'text'" in r.stderr


def test_dev_subsampling_keeps_judged_docs(stdlib_data, tiny_model_dir):
    enc = Encoder.from_pretrained(str(tiny_model_dir))
    m = evaluate_encoder(enc, str(stdlib_data / "dev"), max_queries=30, max_docs=50, progress=False)
    assert m["num_queries"] == 30 and m["num_docs"] == 50
    m = evaluate_encoder(enc, str(stdlib_data / "dev"), max_queries=30, max_docs=10, progress=False)
    assert m["num_docs"] == 30  # judged docs are never dropped
