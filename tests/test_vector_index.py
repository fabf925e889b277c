"""Index artifacts without Ray: shards -> build -> load round trip for every kind, recall, errors."""

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from negatron.cluster.config import ConfigError
from negatron.serve.index import write_corpus
from negatron.trainers.embed import MANIFEST, shard_file, shard_table
from negatron.trainers.vector_index import build_index, exact_topk, load_artifact, read_manifest, recall_at


def _embeddings(folder, n=600, d=16, shard_rows=128, seed=0):
    """A corpus and its `negatron embed`-format shards, with clustered unit vectors."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(12, d))
    emb = (centers[rng.integers(0, 12, n)] + 0.3 * rng.normal(size=(n, d))).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ids, texts = [f"d{i}" for i in range(n)], [f"text of doc {i}" for i in range(n)]
    corpus = write_corpus(folder / "corpus.parquet", ids, texts)
    out = folder / "emb"
    shards = []
    for i, start in enumerate(range(0, n, shard_rows)):
        rows = min(shard_rows, n - start)
        (out / "shards").mkdir(parents=True, exist_ok=True)
        pq.write_table(shard_table(np.array(ids[start:start + rows]), start, emb[start:start + rows]), out / shard_file(i))
        shards.append({"id": i, "block": 0, "offset": start, "rows": rows, "start": start, "file": shard_file(i)})
    manifest = {"version": 1, "model": {"path": "m", "id": "abc"}, "corpus": {"path": str(corpus), "files": [str(corpus)],
                "rows": n, "fingerprint": "x"}, "max_length": 32, "dim": d, "count": n, "shards": shards, "normalized": True}
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out, emb, texts


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf", "ivfpq"])
def test_build_load_round_trip(tmp_path, kind):
    emb_dir, emb, texts = _embeddings(tmp_path)
    params = {"pq_m": 8, "nprobe": 8} if kind == "ivfpq" else None
    meta = build_index(str(emb_dir), kind, str(tmp_path / "idx"), params=params, eval_queries=50, log=lambda m: None)
    art = load_artifact(str(tmp_path / "idx"))
    assert art.count == 600 and art.meta == meta and meta["model"]["id"] == "abc"
    assert art.doc(123) == ("d123", texts[123])
    scores, rows = art.search(emb[:20], 5)
    exact = emb[:20] @ emb.T
    if kind in ("flat", "hnsw", "ivf"):
        assert (rows[:, 0] == np.arange(20)).all()
        assert np.allclose(scores[:, 0], 1.0, atol=1e-5)
    assert meta["recall_at_10"] is None if kind == "flat" else 0 < meta["recall_at_10"] <= 1
    if kind == "ivfpq":
        assert meta["index_bytes"] < meta["flat_bytes"]  # 8 bytes per vector, not 64
    assert exact.shape == (20, 600)


def test_exact_topk_is_streamed_brute_force(tmp_path):
    emb_dir, emb, _ = _embeddings(tmp_path)
    m = read_manifest(str(emb_dir))
    s, r = exact_topk(str(emb_dir), m, emb[:7], 11)
    want = np.argsort(-(emb[:7] @ emb.T), axis=1)[:, :11]
    assert (np.sort(r, 1) == np.sort(want, 1)).all()
    assert recall_at(r, want, np.arange(7), 10) == 1.0
    assert recall_at(np.full_like(r, -1), want, np.arange(7), 10) == 0.0


def test_errors_name_the_problem(tmp_path):
    emb_dir, _, _ = _embeddings(tmp_path)
    with pytest.raises(ConfigError, match="no manifest.json"):
        build_index(str(tmp_path), "flat", str(tmp_path / "x"))
    with pytest.raises(ConfigError, match="index kind must be one of"):
        build_index(str(emb_dir), "lsh", str(tmp_path / "x"))
    with pytest.raises(ConfigError, match="must divide the dimension 16"):
        build_index(str(emb_dir), "ivfpq", str(tmp_path / "x"), params={"pq_m": 5}, log=lambda m: None)
    other = write_corpus(tmp_path / "other.parquet", ["a"], ["b"])
    with pytest.raises(ConfigError, match="has 1 rows, the embeddings 600"):
        build_index(str(emb_dir), "flat", str(tmp_path / "x"), corpus=str(other), log=lambda m: None)
    with pytest.raises(ConfigError, match="not an index artifact"):
        load_artifact(str(tmp_path))
    build_index(str(emb_dir), "flat", str(tmp_path / "ok"), log=lambda m: None)
    (tmp_path / "ok" / "index.faiss").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="corrupt index artifact"):
        load_artifact(str(tmp_path / "ok"))
    r = subprocess.run([sys.executable, "-m", "negatron.cluster.cli", "index", "build", "--embeddings", str(tmp_path),
                        "--kind", "flat", "--out", str(tmp_path / "y")], capture_output=True, text=True)
    assert r.returncode == 2 and "no manifest.json" in r.stderr and "Traceback" not in r.stderr
