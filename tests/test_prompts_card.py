"""Query/document prompts (model.query_prompt / model.document_prompt), the checkpoint's
sentence-transformers config and model card, /metrics merging and Cohere documents. No Ray."""

import json

import numpy as np
import pytest
import torch
import yaml

from negatron.cluster.config import load_config
from negatron.trainers.model_io import ModelLoadError, model_id, read_prompts
from negatron.trainers.step import ContrastiveModel
from tests.helpers import make_tiny_encoder

Q, D = "query: ", "passage: "


def _prompted(seed=0):
    enc = make_tiny_encoder(seed=seed).eval()
    enc.set_prompts(Q, D)
    return enc


def test_roles_prepend_their_prompt_and_none_embeds_as_given():
    enc = _prompted()
    texts = ["parse a date", "join two paths"]
    np.testing.assert_allclose(enc.encode(texts, role="query"), enc.encode([Q + t for t in texts]), atol=1e-6)
    np.testing.assert_allclose(enc.encode(texts, role="document"), enc.encode([D + t for t in texts]), atol=1e-6)
    assert not np.allclose(enc.encode(texts), enc.encode(texts, role="query"), atol=1e-4)
    with torch.no_grad():
        np.testing.assert_allclose(enc.encode_batch(texts, role="query").numpy(),
                                   enc.encode([Q + t for t in texts]), atol=1e-5)
    with pytest.raises(ValueError, match="role"):
        enc.encode(texts, role="passage")
    enc.set_prompts(query="")  # "" removes, None keeps
    assert enc.prompts == {"document": D}


def test_training_step_uses_the_prompts():
    """The loss with prompts set equals the loss of an unprompted model fed the prefixed texts."""
    batch = {"query": [f"what does helper {i} do" for i in range(4)],
             "positive": [f"def helper_{i}(x): return x * {i}" for i in range(4)], "pos_ids": torch.arange(4)}
    with_prompts = ContrastiveModel(_prompted(), temperature=0.1).eval()
    plain = ContrastiveModel(make_tiny_encoder(seed=0).eval(), temperature=0.1).eval()
    prefixed = dict(batch, query=[Q + t for t in batch["query"]], positive=[D + t for t in batch["positive"]])
    with torch.no_grad():
        a, _ = with_prompts.loss(batch, 0)
        b, _ = plain.loss(prefixed, 0)
        c, _ = plain.loss(batch, 0)
    assert float(a) == pytest.approx(float(b), abs=1e-6)
    assert float(a) != pytest.approx(float(c), abs=1e-4)


def test_saved_folder_carries_prompts_and_similarity_to_sentence_transformers(tmp_path):
    from sentence_transformers import SentenceTransformer

    from negatron.trainers.encoder import Encoder

    enc = _prompted()
    enc.save(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config_sentence_transformers.json").read_text())
    assert cfg["prompts"] == {"query": Q, "document": D} and cfg["similarity_fn_name"] == "cosine"
    assert Encoder.from_pretrained(str(tmp_path / "m")).prompts == {"query": Q, "document": D}
    st = SentenceTransformer(str(tmp_path / "m"), device="cpu")
    assert st.prompts["query"] == Q and st.prompts["document"] == D and st.similarity_fn_name == "cosine"
    texts = ["read a config file", "sort a list"]
    np.testing.assert_allclose(st.encode_query(texts), enc.encode(texts, role="query"), atol=1e-5)
    np.testing.assert_allclose(st.encode_document(texts), enc.encode(texts, role="document"), atol=1e-5)
    # a model card changes no embedding: the content id ignores it
    before = model_id(tmp_path / "m")
    (tmp_path / "m" / "README.md").write_text("# card")
    assert model_id(tmp_path / "m") == before


def test_document_prompt_is_read_under_sentence_transformers_other_names(tmp_path):
    (tmp_path / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {"query": "q: ", "passage": "p: "}}))
    assert read_prompts(tmp_path) == {"query": "q: ", "document": "p: "}
    (tmp_path / "config_sentence_transformers.json").write_text("not json")
    with pytest.raises(ModelLoadError, match="config_sentence_transformers.json: corrupt JSON"):
        read_prompts(tmp_path)  # one line naming the file, as for every other model file


def test_config_prompts_are_for_bi_encoders_only():
    cfg = load_config(None, ["model.query_prompt=query: "])
    assert cfg.model.query_prompt == "query: "
    with pytest.raises(Exception, match="model.query_prompt is for bi-encoders"):
        load_config(None, ["model.kind=cross-encoder", "bank.size=0", "model.query_prompt=query: "])


def test_model_card_has_metadata_usage_setup_and_metrics(tmp_path):
    from negatron.trainers.model_card import dev_columns, render, write_model_card

    cfg = load_config(None, ["model.query_prompt=query: ", "data.train=/data/train.parquet"]).to_dict()
    cols = dev_columns({"mrr@10": 0.61, "loss": 1.2}, {"mrr@10": 0.63}, {"mrr@10": 0.6, "ndcg@10": 0.7})
    text = render(cfg, "my-run", cols, 120, with_plot=True)
    front = yaml.safe_load(text.split("---")[1])
    assert front["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert front["library_name"] == "sentence-transformers" and front["pipeline_tag"] == "sentence-similarity"
    assert "encode_query" in text and "| mrr@10 | 0.6100 | 0.6300 | 0.6000 |" in text
    assert "loss" not in cols["dev (final)"] and "'query: '" in text and "![" in text
    write_model_card(tmp_path, cfg, "my-run", cols, 120, plot=None)
    assert (tmp_path / "README.md").read_text().startswith("---")


def test_metrics_merge_keeps_one_family_per_name_with_replica_labels():
    from prometheus_client import CollectorRegistry, Counter, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from negatron.serve.metrics import merge

    texts = []
    for n in (1, 2):
        r = CollectorRegistry()
        Counter("negatron_x", "x", ["model"], registry=r).labels("m").inc(n)
        texts.append(generate_latest(r).decode())
    out = merge([({"replica": "a"}, texts[0]), ({"replica": "b"}, texts[1])])
    fams = list(text_string_to_metric_families(out))
    assert [f.name for f in fams] == ["negatron_x"]
    assert sorted((s.labels["replica"], s.value) for s in fams[0].samples) == [("a", 1.0), ("b", 2.0)]
    assert out.count("# TYPE negatron_x") == 1


def test_cohere_documents_to_text():
    from negatron.serve.api import document_text
    from negatron.serve.schemas import ApiError

    assert document_text("plain", 0, None) == "plain"
    assert document_text({"text": "t", "id": 3}, 0, None) == "t"
    assert document_text({"title": "A", "body": "B"}, 0, ["title", "body"]) == "title: A\nbody: B"
    with pytest.raises(ApiError, match=r"documents\[2\]"):
        document_text({"title": "A"}, 2, None)
    with pytest.raises(ApiError, match="'body'"):
        document_text({"title": "A"}, 0, ["title", "body"])
