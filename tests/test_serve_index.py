"""The retriever's index and cache, the cross-encoder scorer and the serve config: no Ray."""

import numpy as np
import pytest

from negatron.cluster.config import ConfigError, load_config
from negatron.serve.index import load_or_build, make_index, model_id, write_corpus
from negatron.trainers.schema import SchemaError
from tests.helpers import make_tiny_cross_encoder, make_tiny_encoder


def test_index_kinds_find_exact_matches():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(500, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    for kind in ("flat", "hnsw", "ivf"):
        index = make_index(emb, kind, ivf_nprobe=64)
        _, rows = index.search(emb[:20], 1)
        assert (rows[:, 0] == np.arange(20)).mean() >= 0.95, kind


def test_cache_is_keyed_by_checkpoint_corpus_and_settings(tmp_path):
    enc_a, enc_b = make_tiny_encoder(seed=0), make_tiny_encoder(seed=1)
    enc_a.save(tmp_path / "a")
    enc_b.save(tmp_path / "b")
    corpus = write_corpus(tmp_path / "c.parquet", ["x", "y", "z"], ["def f(): pass", "class A: pass", "import os"])
    calls = []

    def embed_with(enc):
        def embed(texts):
            calls.append(len(texts))
            return enc.encode(texts)
        return embed

    logs = []
    first = load_or_build(corpus, tmp_path / "a", embed_with(enc_a), cache_dir=tmp_path / "cache", log=logs.append)
    again = load_or_build(corpus, tmp_path / "a", embed_with(enc_a), cache_dir=tmp_path / "cache", log=logs.append)
    assert not first.from_cache and again.from_cache and calls == [3] and first.key == again.key
    other = load_or_build(corpus, tmp_path / "b", embed_with(enc_b), cache_dir=tmp_path / "cache", log=logs.append)
    assert not other.from_cache and other.key != first.key  # a new checkpoint never reuses an index
    hnsw = load_or_build(corpus, tmp_path / "a", embed_with(enc_a), kind="hnsw", cache_dir=tmp_path / "cache", log=logs.append)
    assert hnsw.key != first.key
    assert model_id(tmp_path / "a") != model_id(tmp_path / "b")
    # a corrupt cache file is rebuilt, not trusted
    (tmp_path / "cache" / first.key / "index.faiss").write_bytes(b"garbage")
    rebuilt = load_or_build(corpus, tmp_path / "a", embed_with(enc_a), cache_dir=tmp_path / "cache", log=logs.append)
    assert not rebuilt.from_cache and any("unreadable" in m for m in logs)
    scores, rows = rebuilt.search(enc_a.encode(["class A: pass"]), 2)
    assert rebuilt.doc_ids[rows[0, 0]] == "y"


def test_corpus_with_missing_column_is_a_clear_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["a"], "text": ["t"]}), tmp_path / "bad.parquet")
    enc = make_tiny_encoder()
    enc.save(tmp_path / "m")
    with pytest.raises(SchemaError, match="missing column.*'doc_id'"):
        load_or_build(tmp_path / "bad.parquet", tmp_path / "m", enc.encode)


def test_cross_encoder_scores_match_sentence_transformers(tmp_path):
    from sentence_transformers import CrossEncoder as STCrossEncoder

    from negatron.trainers.cross_encoder import CrossEncoder

    make_tiny_cross_encoder(tmp_path / "ce")
    pairs = [("sort keys", "def sort(d): return sorted(d)"), ("open file", "with open(p) as f: pass"),
             ("sort keys", "x = 1")]
    ours = CrossEncoder.from_pretrained(tmp_path / "ce").score([q for q, _ in pairs], [t for _, t in pairs], chunk_size=2)
    theirs = STCrossEncoder(str(tmp_path / "ce"), device="cpu").predict(pairs)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_cross_encoder_rejects_a_bi_encoder_folder(tmp_path):
    from negatron.trainers.cross_encoder import CrossEncoder
    from negatron.trainers.encoder import ModelLoadError

    make_tiny_encoder().save(tmp_path / "bi")
    with pytest.raises(ModelLoadError, match="not a cross-encoder"):
        CrossEncoder.from_pretrained(tmp_path / "bi")


def test_serve_config_keys_and_errors():
    cfg = load_config(None, ["serve.encoder.scale.max_replicas=4", "serve.limits.overlong=reject"])
    assert cfg.serve.encoder.scale.max_replicas == 4 and cfg.serve.host == "127.0.0.1"
    with pytest.raises(ConfigError, match="min_replicas 3 exceeds max_replicas 1"):
        load_config(None, ["serve.encoder.scale.min_replicas=3"])
    with pytest.raises(ConfigError, match="serve.limits.overlong"):
        load_config(None, ["serve.limits.overlong=cut"])
    with pytest.raises(ConfigError, match="unknown config key 'serve.encoder.replicas'"):
        load_config(None, ["serve.encoder.replicas=2"])
    with pytest.raises(ConfigError, match="max_ongoing_requests"):
        load_config(None, ["serve.encoder.scale.max_ongoing_requests=2"])


def test_serve_section_falls_back_to_the_run_checkpoint(tmp_path):
    from negatron.serve.app import resolve_section

    cfg = load_config(None, [f"run.storage_path={tmp_path}", "run.name=r1"])
    assert resolve_section(cfg).encoder.path == "default"  # no trained run yet: model.path
    make_tiny_encoder().save(tmp_path / "r1" / "final")
    assert resolve_section(cfg).encoder.path == str((tmp_path / "r1" / "final").resolve())


def test_cache_key_covers_tokenizer_files_but_not_training_state(tmp_path):
    enc = make_tiny_encoder()
    enc.save(tmp_path / "m")
    before = model_id(tmp_path / "m")
    (tmp_path / "m" / "train_state").mkdir()
    (tmp_path / "m" / "train_state" / "optimizer.pt").write_bytes(b"x")
    assert model_id(tmp_path / "m") == before
    vocab = next((p for p in (tmp_path / "m").iterdir() if p.name in ("vocab.txt", "merges.txt")), None)
    target = vocab or (tmp_path / "m" / "spiece.model")
    target.write_text((target.read_text() if target.exists() else "") + "\nnewtoken\n")
    assert model_id(tmp_path / "m") != before


def test_corpus_rewritten_while_building_never_caches_old_embeddings_under_the_new_key(tmp_path, monkeypatch):
    import negatron.serve.index as index_mod

    enc = make_tiny_encoder()
    enc.save(tmp_path / "m")
    corpus = write_corpus(tmp_path / "c.parquet", ["x", "y"], ["def old(): pass", "class Old: pass"])
    real_check = index_mod.check_table

    def check_then_rewrite(path, columns, data=None):
        table = real_check(path, columns, data=data)
        write_corpus(corpus, ["x", "y"], ["def new(): pass", "class New: pass"])  # a rewrite right after the read
        return table

    monkeypatch.setattr(index_mod, "check_table", check_then_rewrite)
    built = load_or_build(corpus, tmp_path / "m", enc.encode, cache_dir=tmp_path / "cache", log=lambda m: None)
    assert built.texts == ["def old(): pass", "class Old: pass"]
    monkeypatch.setattr(index_mod, "check_table", real_check)
    again = load_or_build(corpus, tmp_path / "m", enc.encode, cache_dir=tmp_path / "cache", log=lambda m: None)
    assert not again.from_cache and again.texts == ["def new(): pass", "class New: pass"]


def test_read_only_corpus_folder_falls_back_to_the_user_cache(tmp_path, monkeypatch):
    enc = make_tiny_encoder()
    enc.save(tmp_path / "m")
    data = tmp_path / "data"
    corpus = write_corpus(data / "c.parquet", ["x", "y"], ["def f(): pass", "class A: pass"])
    (data / ".negatron_index").write_text("not a folder")  # the default cache location cannot be created
    monkeypatch.setenv("NEGATRON_CACHE", str(tmp_path / "usercache"))
    logs = []
    built = load_or_build(corpus, tmp_path / "m", enc.encode, log=logs.append)
    assert (tmp_path / "usercache" / "index" / built.key / "index.faiss").is_file()
    assert any("cannot write the cache beside the corpus" in m for m in logs)
    assert load_or_build(corpus, tmp_path / "m", enc.encode, log=logs.append).from_cache
