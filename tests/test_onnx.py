"""The ONNX Runtime backend: exports that match torch, the cache by content hash, the int8
quality gate, and `negatron export`. No Ray (the served backend is in test_serve_ray.py)."""

import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from negatron.trainers import onnx_backend as ob  # noqa: E402
from tests.helpers import make_tiny_cross_encoder, make_tiny_encoder  # noqa: E402

TEXTS = ["parse a date string", "def join(a, b):\n    return a + '/' + b", "x"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    enc = make_tiny_encoder(seed=3)
    enc.set_prompts("query: ", "passage: ")
    enc.save(root / "enc")
    make_tiny_cross_encoder(root / "ce")
    return root


def test_encoder_export_matches_torch_with_prompts_and_uneven_lengths(tiny):
    from negatron.trainers.encoder import Encoder

    dest = ob.export(tiny / "enc", log=lambda s: None)
    assert dest == tiny / "enc" / "onnx" / "fp32"
    onnx_enc, torch_enc = ob.load(tiny / "enc"), Encoder.from_pretrained(str(tiny / "enc"))
    assert onnx_enc.prompts == {"query": "query: ", "document": "passage: "} and onnx_enc.dim == torch_enc.dim
    for role in (None, "query", "document"):
        np.testing.assert_allclose(onnx_enc.encode(TEXTS, batch_size=2, role=role),
                                   torch_enc.encode(TEXTS, batch_size=2, role=role), atol=1e-4)
    stats = {}
    onnx_enc.encode(TEXTS, stats=stats)
    assert 0 < stats["tokens"] <= stats["slots"]


def test_cross_encoder_export_matches_torch(tiny):
    from negatron.trainers.cross_encoder import CrossEncoder

    model = ob.load(tiny / "ce")
    assert isinstance(model, ob.OnnxCrossEncoder)
    q = ["what joins paths"] * len(TEXTS)
    ref = CrossEncoder.from_pretrained(tiny / "ce")
    np.testing.assert_allclose(model.score(q, TEXTS, chunk_size=2), ref.score(q, TEXTS), atol=1e-4)
    np.testing.assert_allclose(model.score(q, TEXTS, raw=True), ref.score(q, TEXTS, raw=True), atol=1e-4)


def test_export_is_cached_by_content_hash_and_redone_when_the_model_changes(tiny, tmp_path):
    import shutil

    from negatron.trainers.model_io import model_id

    folder = tmp_path / "m"
    shutil.copytree(tiny / "enc", folder, ignore=shutil.ignore_patterns("onnx"))
    before = model_id(folder)
    dest = ob.export(folder, log=lambda s: None)
    assert model_id(folder) == before  # the export beside the model is not part of it
    stamp = (dest / "model.onnx").stat().st_mtime_ns
    assert ob.export(folder, log=lambda s: None) == dest and (dest / "model.onnx").stat().st_mtime_ns == stamp
    make_tiny_encoder(seed=9).save(folder)  # retrained into the same folder
    ob.export(folder, log=lambda s: None)
    assert json.loads((dest / ob.META).read_text())["model_id"] == model_id(folder) != before


def test_int8_is_refused_with_the_numbers_when_it_loses_quality(tiny, monkeypatch):
    monkeypatch.setattr(ob, "MIN_COSINE", 1.01)  # no export can reach it
    with pytest.raises(ob.QuantizationRefused, match=r"int8 refused: mean cosine to the fp32 embeddings is [01]\.\d{4} \(min"):
        ob.prepare(tiny / "enc", "int8", log=lambda s: None)
    monkeypatch.setattr(ob, "MIN_COSINE", 0.0)
    dest, check = ob.prepare(tiny / "enc", "int8", log=lambda s: None)
    assert dest.name == "int8" and check["check"] == "cosine" and -1 <= check["cosine_mean"] <= 1
    # the verdict is kept with the export: a restart does not judge again
    assert json.loads((dest / ob.META).read_text())["checks"]["check:cosine"] == check


def test_int8_judged_by_dev_mrr(tiny, tmp_path, monkeypatch):
    from tests.helpers import write_synthetic_task

    dev = write_synthetic_task(tmp_path / "task", n_train=4, n_dev=12, n_distract=12) / "dev"
    monkeypatch.setattr(ob, "MAX_MRR_DROP", 1.0)
    _, check = ob.prepare(tiny / "enc", "int8", str(dev), out=tmp_path / "int8", log=lambda s: None)
    assert check["check"] == "dev" and set(check) >= {"mrr@10_fp32", "mrr@10_int8", "mrr@10_change"}
    monkeypatch.setattr(ob, "MAX_MRR_DROP", -1.0)  # any result is "too much": refused
    with pytest.raises(ob.QuantizationRefused, match="dev MRR@10 drops from"):
        ob.prepare(tiny / "enc", "int8", str(dev), out=tmp_path / "int8b", log=lambda s: None)


def test_negatron_export_command(tiny, tmp_path, capsys):
    from negatron.cluster.cli import main

    assert main(["export", "--model", str(tiny / "enc"), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "model.onnx" in out and "serve.encoder.backend=onnx" in out
    assert json.loads((tmp_path / "out" / ob.META).read_text())["kind"] == ob.EMBEDDER
    assert main(["export", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")]) != 0
    assert "nope" in capsys.readouterr().err
