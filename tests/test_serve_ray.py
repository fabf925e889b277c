"""A real Ray Serve app over HTTP: embeddings, rerank, search, errors, auth, multiplexing,
index swap, autoscaling and the Serve config file (the `negatron serve` process: test_serve_process.py)."""

import base64
import json
import os
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import yaml

from negatron.cluster.config import load_config
from negatron.serve.index import write_corpus
from tests.helpers import make_tiny_cross_encoder, make_tiny_encoder

pytestmark = pytest.mark.ray

KEY_ENV = "NEGATRON_TEST_API_KEY"
KEY = "s3cret-test-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    make_tiny_encoder(seed=0).save(root / "enc")
    enc2 = make_tiny_encoder(seed=1)
    enc2.set_prompts("query: ", "passage: ")  # saved with it: /v1/embeddings input_type applies them
    enc2.save(root / "enc2")
    make_tiny_cross_encoder(root / "ce")
    docs = [f"def handler_{i}(x):\n    return x * {i} + {i % 7}  # item {i}" for i in range(60)]
    write_corpus(root / "corpus.parquet", [f"d{i}" for i in range(60)], docs)
    docs_b = [f"class Widget{i}:\n    size = {i}" for i in range(30)]
    write_corpus(root / "corpus_b.parquet", [f"w{i}" for i in range(30)], docs_b)
    return {"root": root, "docs": docs, "docs_b": docs_b}


def _section(assets, port, corpus="corpus.parquet"):
    from negatron.serve.app import resolve_section

    root = assets["root"]
    cfg = load_config(None, [
        f"serve.encoder.path={root / 'enc'}", "serve.encoder.name=tiny", f"serve.encoder.models={{tiny2: {root / 'enc2'}}}",
        f"serve.reranker.path={root / 'ce'}", f"serve.retriever.corpus={root / corpus}", f"serve.port={port}",
        f"serve.api_key_env={KEY_ENV}", "serve.limits.max_texts=16", "serve.limits.max_text_chars=2000",
        "serve.limits.overlong=reject", "serve.limits.max_top_k=20",
        "serve.encoder.scale.num_cpus=0.25", "serve.encoder.scale.max_replicas=2",
        "serve.encoder.scale.target_ongoing_requests=1", "serve.encoder.scale.max_ongoing_requests=8",
        "serve.encoder.scale.upscale_delay_s=1", "serve.encoder.scale.downscale_delay_s=4",
        "serve.encoder.scale.look_back_period_s=2", "serve.encoder.batch.batch_wait_timeout_s=0.02",
        "serve.reranker.scale.num_cpus=0.25", "serve.retriever.scale.num_cpus=0.25",
    ])
    return resolve_section(cfg)


@pytest.fixture(scope="module")
def server(assets):
    import ray
    from ray import serve

    from negatron.serve.app import start

    os.environ[KEY_ENV] = KEY  # replicas inherit the environment Ray starts with
    os.environ["RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "0.5"
    os.environ["RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "0.5"
    from negatron.cluster.local import init_local
    init_local(num_cpus=4, include_dashboard=False)
    port = _free_port()
    section = _section(assets, port)
    url = start(section, blocking_wait_s=300)
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    yield {"url": url, "client": client, "section": section, "port": port}
    client.close()
    serve.shutdown()
    ray.shutdown()


def test_embeddings_equal_the_checkpoint(server, assets):
    from negatron.trainers.encoder import Encoder

    texts = ["sort a list of keys", "def f(x):\n    return x + 1", "open a file and read it all"]
    r = server["client"].post("/v1/embeddings", json={"input": texts, "model": "tiny"})
    assert r.status_code == 200, r.text
    body = r.json()
    got = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    want = Encoder.from_pretrained(str(assets["root"] / "enc")).encode(texts)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert body["model"] == "tiny" and body["usage"]["prompt_tokens"] > 0
    # base64 = little-endian float32, what the openai client asks for by default
    r = server["client"].post("/v1/embeddings", json={"input": texts[0], "encoding_format": "base64"})
    vec = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vec, want[0], atol=1e-5)


def test_openai_client_works_unchanged(server, assets):
    import openai

    from negatron.trainers.encoder import Encoder

    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY)
    texts = ["parse a date string", "join path parts"]
    res = client.embeddings.create(model="tiny", input=texts)
    got = np.array([d.embedding for d in res.data], dtype=np.float32)
    np.testing.assert_allclose(got, Encoder.from_pretrained(str(assets["root"] / "enc")).encode(texts), atol=1e-5)
    assert [m.id for m in client.models.list().data] == ["tiny", "tiny2"]
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="x")


def test_multiplexed_second_model(server, assets):
    from negatron.trainers.encoder import Encoder

    texts = ["read a config file"]
    a = np.array(server["client"].post("/v1/embeddings", json={"input": texts, "model": "tiny"}).json()["data"][0]["embedding"])
    b = np.array(server["client"].post("/v1/embeddings", json={"input": texts, "model": "tiny2"}).json()["data"][0]["embedding"])
    np.testing.assert_allclose(b, Encoder.from_pretrained(str(assets["root"] / "enc2")).encode(texts)[0], atol=1e-5)
    assert not np.allclose(a, b, atol=1e-3)


def test_input_type_applies_the_models_saved_prompts(server, assets):
    from negatron.trainers.encoder import Encoder

    enc = Encoder.from_pretrained(str(assets["root"] / "enc2"))
    texts = ["read a config file", "sort a list"]
    for input_type, role in [("query", "query"), ("document", "document"), ("search_query", "query")]:
        r = server["client"].post("/v1/embeddings", json={"input": texts, "model": "tiny2", "input_type": input_type})
        assert r.status_code == 200, r.text
        got = np.array([d["embedding"] for d in r.json()["data"]])
        np.testing.assert_allclose(got, enc.encode(texts, role=role), atol=1e-5)
    # the prompt's tokens are counted like the text's
    plain = server["client"].post("/v1/embeddings", json={"input": texts, "model": "tiny2"}).json()
    q = server["client"].post("/v1/embeddings", json={"input": texts, "model": "tiny2", "input_type": "query"}).json()
    assert q["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"] + 2 * len(enc.tokenizer.tokenize("query: "))
    r = server["client"].post("/v1/embeddings", json={"input": texts, "input_type": "passage"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "input_type"


def test_rerank_order_equals_direct_cross_encoder(server, assets):
    from sentence_transformers import CrossEncoder

    query = "multiply the input"
    texts = assets["docs"][:12]
    r = server["client"].post("/rerank", json={"query": query, "texts": texts, "top_n": 5, "return_text": True})
    assert r.status_code == 200, r.text
    res = r.json()
    direct = CrossEncoder(str(assets["root"] / "ce"), device="cpu").predict([(query, t) for t in texts])
    want = np.argsort(-direct, kind="stable")[:5]
    assert [x["index"] for x in res] == [int(i) for i in want]
    np.testing.assert_allclose([x["score"] for x in res], direct[want], atol=1e-5)
    assert res[0]["text"] == texts[res[0]["index"]]
    r = server["client"].post("/rerank", json={"query": query, "texts": texts[:3]})
    assert len(r.json()) == 3 and "text" not in r.json()[0]


def test_cohere_client_works_unchanged_against_v2_and_v1_rerank(server, assets):
    import cohere

    query, texts = "multiply the input", assets["docs"][:8]
    want = server["client"].post("/rerank", json={"query": query, "texts": texts, "top_n": 3}).json()
    co = cohere.ClientV2(api_key=KEY, base_url=server["url"])
    res = co.rerank(model="ce", query=query, documents=texts, top_n=3)  # the folder's name
    assert [r.index for r in res.results] == [w["index"] for w in want]
    np.testing.assert_allclose([r.relevance_score for r in res.results], [w["score"] for w in want], atol=1e-6)
    assert res.meta.api_version.version == "2"
    v1 = cohere.Client(api_key=KEY, base_url=server["url"])
    res = v1.rerank(model="default", query=query, documents=[{"text": t, "id": i} for i, t in enumerate(texts)],
                    top_n=3, return_documents=True)
    assert [r.index for r in res.results] == [w["index"] for w in want]
    assert res.results[0].document.text == texts[res.results[0].index]
    with pytest.raises(cohere.errors.NotFoundError):
        co.rerank(model="rerank-v3.5", query=query, documents=texts)
    with pytest.raises(cohere.errors.UnauthorizedError):
        cohere.ClientV2(api_key="wrong", base_url=server["url"]).rerank(model="ce", query=query, documents=texts)
    # semi-structured documents: the named fields as "name: value" lines; a missing one is a 400
    r = server["client"].post("/v1/rerank", json={"query": query, "documents": [{"title": "a", "body": "b"}],
                                                  "rank_fields": ["title", "body"]})
    assert r.status_code == 200 and r.json()["results"][0]["index"] == 0
    r = server["client"].post("/v1/rerank", json={"query": query, "documents": [{"title": "a"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "documents[0]"
    # max_tokens_per_doc truncates before scoring: the same as sending the cut text
    long = texts[0] * 5
    cut = server["client"].post("/v2/rerank", json={"query": query, "documents": [long], "max_tokens_per_doc": 6})
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(assets["root"] / "ce"))
    short = tok.decode(tok(long, add_special_tokens=False)["input_ids"][:6])
    plain = server["client"].post("/v2/rerank", json={"query": query, "documents": [short]})
    assert cut.json()["results"][0]["relevance_score"] == pytest.approx(plain.json()["results"][0]["relevance_score"])


def test_metrics_are_prometheus_text_from_every_deployment(server):
    from prometheus_client.parser import text_string_to_metric_families

    c = server["client"]
    assert c.post("/v1/embeddings", json={"input": ["one text", "and a longer second text here"]}).status_code == 200
    assert c.post("/search", json={"query": "multiply", "top_k": 3}).status_code == 200
    assert c.post("/rerank", json={"query": "q", "texts": ["a", "b"]}).status_code == 200
    assert httpx.get(server["url"] + "/v1/models").status_code == 401  # counted, refused before routing
    assert httpx.get(server["url"] + "/metrics").status_code == 401  # behind the key like the rest
    r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    fams = {f.name: f for f in text_string_to_metric_families(r.text)}

    def total(name, **labels):  # a sample name (counters' families drop "_total")
        return sum(s.value for f in fams.values() for s in f.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    assert total("negatron_http_requests_total", route="/v1/embeddings", code="200") >= 1
    assert total("negatron_http_requests_total", route="/v1/models", code="401") >= 1
    assert total("negatron_http_request_duration_seconds_count", route="/search") >= 1
    assert total("negatron_encoder_texts_total", deployment="Encoder", model="tiny") >= 2
    tokens, slots = total("negatron_encoder_tokens_total"), total("negatron_encoder_padded_slots_total")
    assert 0 < tokens <= slots  # padding waste = 1 - tokens / slots
    assert total("negatron_encoder_padding_waste_ratio_count") >= 1
    assert total("negatron_reranker_pairs_total", deployment="Reranker") >= 2
    assert total("negatron_search_batch_queries_count", deployment="Retriever") >= 1
    assert total("negatron_index_documents") == 60
    assert "negatron_coalescer_queue_depth" in fams and "negatron_index_swaps" in fams
    assert total("negatron_index_swaps_total") == 0
    assert {s.labels["deployment"] for s in fams["negatron_metrics_source_up"].samples} == {
        "Encoder", "Reranker", "Retriever"}
    assert all(s.value == 1 for s in fams["negatron_metrics_source_up"].samples)


def test_search_finds_known_documents(server, assets):
    docs = assets["docs"]
    for i in (3, 17, 42):
        r = server["client"].post("/search", json={"query": docs[i], "top_k": 5})
        assert r.status_code == 200, r.text
        hits = r.json()
        assert hits[0]["doc_id"] == f"d{i}" and hits[0]["text"] == docs[i]
        assert len(hits) == 5 and all(hits[j]["score"] >= hits[j + 1]["score"] for j in range(4))
    r = server["client"].post("/search", json={"query": docs[5], "top_k": 3, "rerank": True})
    hits = r.json()
    assert r.status_code == 200 and len(hits) == 3
    assert all("retrieval_score" in h for h in hits)
    assert all(hits[j]["score"] >= hits[j + 1]["score"] for j in range(2))


BAD = [
    ("/v1/embeddings", {"input": ""}, 400, "input"),
    ("/v1/embeddings", {"input": []}, 400, "input"),
    ("/v1/embeddings", {"input": ["ok", "  "]}, 400, "input[1]"),
    ("/v1/embeddings", {"input": ["x"] * 17}, 413, "input"),
    ("/v1/embeddings", {"input": "word " * 500}, 413, "input"),  # over the 2000-char limit
    ("/v1/embeddings", {"input": ["ok", "word " * 100]}, 413, "input[1]"),  # over 64 tokens, overlong=reject
    ("/v1/embeddings", {"input": 5}, 422, "input"),
    ("/v1/embeddings", {"input": "x", "encoding_format": "int8"}, 422, "encoding_format"),
    ("/v1/embeddings", {"input": "x", "model": "gpt-4"}, 404, "model"),
    ("/v1/embeddings", {"input": "x", "dimensions": 7}, 400, "dimensions"),
    ("/rerank", {"query": "q", "texts": []}, 400, "texts"),
    ("/rerank", {"query": "", "texts": ["a"]}, 400, "query"),
    ("/rerank", {"query": "q", "texts": "not a list"}, 422, "texts"),
    ("/rerank", {"query": "q", "texts": ["a"], "top_n": 0}, 422, "top_n"),
    ("/search", {"query": "q", "top_k": 21}, 400, "top_k"),
    ("/search", {"query": "q", "top_k": 0}, 422, "top_k"),
    ("/search", {"query": "q", "colour": "red"}, 422, "colour"),
]


@pytest.mark.parametrize("path,body,status,param", BAD)
def test_bad_requests_get_4xx_naming_the_field(server, path, body, status, param):
    r = server["client"].post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"]


def test_malformed_json_and_auth(server):
    r = server["client"].post("/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "error" in r.json()
    anon = httpx.Client(base_url=server["url"], timeout=30)
    assert anon.get("/healthz").json()["status"] == "ok"  # probes need no key
    assert anon.post("/v1/embeddings", json={"input": "x"}).status_code == 401
    r = anon.post("/v1/embeddings", json={"input": "x"}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    # every route but /healthz needs the key, the schema and docs included, bad bodies too
    for method, path in [("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/v1/models"), ("POST", "/rerank"),
                         ("POST", "/search"), ("GET", "/nowhere")]:
        r = anon.request(method, path, content=b"{not json")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, r.text)
    assert server["client"].get("/openapi.json").status_code == 200


def test_oversized_bodies_are_refused_before_parsing(server):
    c = server["client"]
    big = b'{"input": "' + b"x" * 9_000_000 + b'"}'
    r = c.post("/v1/embeddings", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large", r.text

    def chunks():  # no Content-Length: counted while streaming
        yield b'{"input": "'
        for _ in range(100):
            yield b"y" * 100_000
        yield b'"}'

    r = c.post("/v1/embeddings", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large", r.text
    assert c.post("/v1/embeddings", json={"input": ["ok"]}).status_code == 200


def test_api_fuzzed_from_its_openapi_schema(server):
    """schemathesis draws valid and invalid requests for every operation of the served OpenAPI
    schema: no 5xx, and every 4xx carries the JSON error body."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    spec = server["client"].get("/openapi.json").json()
    schema = schemathesis.openapi.from_dict(spec)
    ops = [r.ok() for r in schema.get_all_operations()]
    assert {op.path for op in ops} >= {"/v1/embeddings", "/rerank", "/search", "/healthz", "/v1/models"}
    strategy = st.one_of(*[op.as_strategy(generation_mode=mode) for op in ops
                           for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)])
    seen: dict[int, int] = {}
    auth = {"Authorization": f"Bearer {KEY}"}

    @settings(max_examples=150, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def fuzz(case):
        r = case.call(base_url=server["url"], headers=auth, timeout=60)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (case.method, case.path, case.body, r.text[:300])
        if r.status_code >= 400:
            assert "error" in r.json() and r.json()["error"]["message"], r.text[:300]

    fuzz()
    assert seen.get(200) and any(400 <= code < 500 for code in seen), seen


def test_index_swaps_without_downtime(server, assets):
    from ray import serve

    from negatron.serve.app import app_builder

    docs_b = assets["docs_b"]
    statuses: list[int] = []
    errors: list[str] = []
    stop = threading.Event()

    def hammer():
        with httpx.Client(base_url=server["url"], headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
            while not stop.is_set():
                r = c.post("/search", json={"query": "return x", "top_k": 3})
                statuses.append(r.status_code)
                if r.status_code != 200:
                    errors.append(r.text[:200])

    t = threading.Thread(target=hammer)
    t.start()
    try:
        new = _section(assets, server["port"], corpus="corpus_b.parquet")
        serve.run(app_builder(new), name=new.app_name, route_prefix="/", blocking=False)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            hits = server["client"].post("/search", json={"query": docs_b[7], "top_k": 1}).json()
            if hits and hits[0]["doc_id"] == "w7":
                break
            time.sleep(0.5)
        else:
            pytest.fail("the retriever never switched to the new corpus")
    finally:
        stop.set()
        t.join()
    assert statuses and all(s == 200 for s in statuses), (sorted(set(statuses)), errors[:3])


def _running_replicas(app: str, deployment: str) -> int:
    from ray import serve

    st = serve.status().applications[app].deployments[deployment]
    return sum(n for state, n in st.replica_states.items() if str(state).endswith("RUNNING"))


def test_encoder_autoscales_up_under_load_and_back_down(server):
    app = server["section"].app_name
    assert _running_replicas(app, "Encoder") == 1
    stop = threading.Event()

    def load():
        with httpx.Client(base_url=server["url"], headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
            while not stop.is_set():
                c.post("/v1/embeddings", json={"input": ["some text to embed here"] * 8})

    threads = [threading.Thread(target=load) for _ in range(12)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 120
        while _running_replicas(app, "Encoder") < 2 and time.monotonic() < deadline:
            time.sleep(1)
        assert _running_replicas(app, "Encoder") == 2, "no second encoder replica under sustained load"
    finally:
        stop.set()
        for t in threads:
            t.join()
    deadline = time.monotonic() + 120
    while _running_replicas(app, "Encoder") > 1 and time.monotonic() < deadline:
        time.sleep(1)
    assert _running_replicas(app, "Encoder") == 1, "the encoder did not scale back down"


def test_serve_build_writes_a_valid_serve_config(tmp_path, assets):
    from ray.serve.schema import ServeDeploySchema

    from negatron.cluster.cli import main
    from negatron.cluster.serve_config import ServeSection

    out = tmp_path / "serve.yaml"
    assert main(["serve", "build", "--model", str(assets["root"] / "enc"), "--corpus",
                 str(assets["root"] / "corpus.parquet"), "--port", "8123", "-o", str(out)]) == 0
    doc = yaml.safe_load(out.read_text())
    schema = ServeDeploySchema.model_validate(doc)
    app = schema.applications[0]
    assert app.import_path == "negatron.serve.app:app_builder" and doc["http_options"]["port"] == 8123
    section = ServeSection.model_validate(app.args)  # what Serve's typed builder will do
    assert section.encoder.path == str(assets["root"] / "enc")
    from negatron.serve.app import app_builder
    assert app_builder(section) is not None  # the builder accepts the file's args
    assert main(["serve", "build", "serve.encoder.scale.max_replicas=0"]) == 2  # bad value: clear error


def test_colocated_encoder_gives_the_same_embeddings(server, assets):
    """serve.encoder.colocate runs the encoders inside the ingress (no Encoder deployment)."""
    from ray import serve

    from negatron.cluster.serve_config import ServeSection
    from negatron.serve.app import app_builder
    from negatron.trainers.encoder import Encoder

    d = server["section"].model_dump()
    d.update(app_name="colocated", api_key_env="")
    d["encoder"]["colocate"] = True
    d["reranker"]["path"] = ""
    d["retriever"]["corpus"] = ""
    section = ServeSection.model_validate(d)
    serve.run(app_builder(section), name="colocated", route_prefix="/colo")
    try:
        assert "Encoder" not in serve.status().applications["colocated"].deployments
        texts = ["sort a list of keys", "def f(x):\n    return x + 1"]
        r = httpx.post(server["url"] + "/colo/v1/embeddings", json={"input": texts, "model": "tiny2"}, timeout=60)
        assert r.status_code == 200, r.text
        got = np.array([x["embedding"] for x in r.json()["data"]], dtype=np.float32)
        np.testing.assert_allclose(got, Encoder.from_pretrained(str(assets["root"] / "enc2")).encode(texts), atol=1e-5)
    finally:
        serve.delete("colocated")


def test_onnx_backend_serves_the_same_embeddings_and_scores(server, assets):
    """serve.encoder.backend / serve.reranker.backend: onnx — exported on the driver, cached beside
    each model, loaded by the Encoder and Reranker replicas; within 1e-4 of torch."""
    pytest.importorskip("onnxruntime")
    from ray import serve

    from negatron.cluster.serve_config import ServeSection
    from negatron.serve.app import app_builder
    from negatron.trainers.cross_encoder import CrossEncoder
    from negatron.trainers.encoder import Encoder

    d = server["section"].model_dump()
    d.update(app_name="onnx", api_key_env="")
    d["encoder"]["backend"] = "onnx"
    d["reranker"]["backend"] = "onnx"
    d["retriever"]["corpus"] = ""
    serve.run(app_builder(ServeSection.model_validate(d)), name="onnx", route_prefix="/onnx")
    try:
        assert (assets["root"] / "enc" / "onnx" / "fp32" / "model.onnx").is_file()
        texts = ["sort a list of keys", "def f(x):\n    return x + 1"]
        r = httpx.post(server["url"] + "/onnx/v1/embeddings", json={"input": texts, "model": "tiny2",
                                                                    "input_type": "query"}, timeout=60)
        assert r.status_code == 200, r.text
        got = np.array([x["embedding"] for x in r.json()["data"]], dtype=np.float32)
        want = Encoder.from_pretrained(str(assets["root"] / "enc2")).encode(texts, role="query")
        np.testing.assert_allclose(got, want, atol=1e-4)
        query, docs = "multiply the input", assets["docs"][:6]
        r = httpx.post(server["url"] + "/onnx/rerank", json={"query": query, "texts": docs}, timeout=60)
        assert r.status_code == 200, r.text
        direct = CrossEncoder.from_pretrained(assets["root"] / "ce").score([query] * len(docs), docs)
        got = {x["index"]: x["score"] for x in r.json()}
        np.testing.assert_allclose([got[i] for i in range(len(docs))], direct, atol=1e-4)
    finally:
        serve.delete("onnx")


def _stream_upload(port: int, mb: int, headers: str = "") -> tuple[str, bytes, int]:
    """POST a chunked body of ``mb`` MB as fast as possible; (status line, body, bytes sent)."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall((f"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}"
               "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode())
    chunk = f"{1 << 20:x}\r\n".encode() + b"x" * (1 << 20) + b"\r\n"
    sent, response = 0, b""
    s.settimeout(0.0)
    try:
        for _ in range(mb):
            view = memoryview(chunk)
            while view and b"\r\n\r\n" not in response:
                try:
                    n = s.send(view)
                    view, sent = view[n:], sent + n
                except BlockingIOError:
                    time.sleep(0.001)
                try:
                    response += s.recv(65536)
                except BlockingIOError:
                    pass
            if b"\r\n\r\n" in response:
                break
    except OSError:
        pass  # the server closed the connection after answering
    s.settimeout(30)
    try:
        while response.count(b"}") < 2:
            got = s.recv(65536)
            if not got:
                break
            response += got
    except OSError:
        pass
    s.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0].decode(), body, sent


def test_nginx_example_caps_chunked_bodies_before_rays_proxy(server, tmp_path):
    """Ray Serve's proxy reads a chunked body ahead of the ingress with no bound of its own, so the
    docs ship an nginx config that caps bodies upstream: it is run here, in front of the server."""
    import shutil
    import subprocess
    from pathlib import Path

    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        pytest.skip("nginx is not installed (.ci/run installs nginx-light)")
    front = _free_port()
    conf = (Path(__file__).resolve().parent.parent / "cluster" / "manifests" / "nginx.conf").read_text()
    conf = conf.replace("127.0.0.1:8000", f"127.0.0.1:{server['port']}").replace(
        "listen 127.0.0.1:8080", f"listen 127.0.0.1:{front}")
    (tmp_path / "nginx.conf").write_text(conf)
    proc = subprocess.Popen([nginx, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"),
                             "-g", "daemon off;" + (" user root;" if os.geteuid() == 0 else "")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        from tests.helpers import wait_for_port

        try:
            wait_for_port(front, proc, 20, "nginx")
        except RuntimeError as e:
            if proc.poll() is None:
                proc.kill()  # its output is readable to the end only once it has stopped
            pytest.fail(f"{e}: {proc.stdout.read().decode()}")
        via = httpx.post(f"http://127.0.0.1:{front}/v1/embeddings", json={"input": "def f(): pass"},
                         headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        assert via.status_code == 200 and len(via.json()["data"]) == 1
        status, body, sent = _stream_upload(front, 200, f"Authorization: Bearer {KEY}\r\n")
        assert " 413 " in status, (status, body[:200])
        assert json.loads(body)["error"]["code"] == "body_too_large"
        assert sent < 100 << 20  # refused long before the end of the 200 MB body
    finally:
        proc.terminate()
        proc.wait(10)


def test_not_ready_until_the_index_can_search(server, assets, monkeypatch, tmp_path):
    """While the Retriever is still building its index, /healthz says 503 (with which deployment is
    not ready) and /search answers a JSON 503 with Retry-After at once, not after a 60 s queue."""
    import asyncio

    from ray import serve

    import negatron.serve.app as app_mod
    from negatron.serve.deployments import RetrieverDeployment

    base = RetrieverDeployment.func_or_class
    built = str(tmp_path / "go")  # the index build "finishes" when the test creates this file

    class SlowRetriever(base):
        async def reconfigure(self, user_config):
            while self.state is None and not os.path.exists(built):
                await asyncio.sleep(0.2)  # a corpus that takes a while to embed
            await super().reconfigure(user_config)

    monkeypatch.setattr(app_mod, "RetrieverDeployment", serve.deployment(name="Retriever")(SlowRetriever))
    app = app_mod.app_builder(_section(assets, server["port"]))
    serve.run_many([serve.RunTarget(app, name="slow", route_prefix="/slow")], wait_for_applications_running=False)
    c = server["client"]
    try:
        deadline = time.monotonic() + 240
        while True:  # until the ingress answers: the proxy holds requests (or says 404) before that
            try:
                r = c.get("/slow/healthz", timeout=5)
                if r.status_code != 404:
                    break
            except httpx.TimeoutException:
                pass
            assert time.monotonic() < deadline, "the slow app's ingress never answered"
            time.sleep(0.5)
        if r.status_code == 503:
            body = r.json()
            assert body["status"] == "starting" and body["deployments"]["retriever"] == "starting"
            assert r.headers["retry-after"] and body["error"]["code"] == "not_ready"
            s = c.post("/slow/search", json={"query": "handler 3", "top_k": 3}, timeout=15)
            assert s.status_code == 503 and s.headers["content-type"].startswith("application/json")
            assert s.json()["error"]["code"] == "not_ready" and int(s.headers["retry-after"]) > 0
            saw_not_ready = True
        else:
            saw_not_ready = False
        open(built, "w").close()
        while True:
            r = c.get("/slow/healthz", timeout=30)
            if r.status_code == 200:
                break
            assert r.status_code == 503 and time.monotonic() < deadline, r.text
            time.sleep(1)
        assert r.json()["deployments"] == {"encoder": "ready", "reranker": "ready", "retriever": "ready"}
        s = c.post("/slow/search", json={"query": "handler 3", "top_k": 3}, timeout=60)
        assert s.status_code == 200 and len(s.json()) == 3
        assert saw_not_ready, "the ingress came up only after the retriever: nothing was tested"
    finally:
        open(built, "w").close()  # a replica stuck in its build would hold serve.delete forever
        serve.delete("slow")
