"""The embedding pipeline on a real local Ray (2 actors), index artifacts served by Ray Serve, and a
checkpoint retrained into the served folder swapped in while /search keeps answering."""

import shutil
import socket
import threading
import time

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest

from negatron.cluster.config import ConfigError, load_config
from negatron.serve.index import write_corpus
from negatron.trainers.embed import embed_corpus, shard_file, shard_vectors
from negatron.trainers.vector_index import build_index
from tests.helpers import make_tiny_encoder

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_local")]

N = 700


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    make_tiny_encoder(seed=0).save(root / "enc")
    make_tiny_encoder(seed=1).save(root / "enc2")
    texts = [f"def handler_{i}(x):\n    return x * {i} + {i % 7}" + "  # pad" * (i % 13) for i in range(N)]
    ids = [f"d{i}" for i in range(N)]
    corpus = root / "corpus"
    corpus.mkdir()
    # two files, several row groups: shards never cross a row group, rows keep the corpus order
    write_corpus(corpus / "a.parquet", ids[:400], texts[:400])
    pq.write_table(pq.read_table(corpus / "a.parquet"), corpus / "a.parquet", row_group_size=150)
    write_corpus(corpus / "b.parquet", ids[400:], texts[400:])
    return {"root": root, "texts": texts, "ids": ids, "corpus": corpus}


def _vectors(out):
    t = pq.read_table(out / "shards").sort_by("row")
    return t.column("doc_id").to_pylist(), shard_vectors(t)


def test_two_actors_give_the_direct_embeddings_and_resume(assets):
    root, out = assets["root"], assets["root"] / "emb"
    logs = []
    m = embed_corpus(str(root / "enc"), str(assets["corpus"]), str(out), actors=2, cpus_per_actor=0.5,
                     shard_rows=128, log=logs.append)
    assert m["count"] == N and m["dim"] == 32 and m["embedded_now"] == N and len(m["shards"]) == 8  # 150+150+100 rows, then 300: 2+2+1+3
    ids, vecs = _vectors(out)
    direct = make_tiny_encoder(seed=0).encode(assets["texts"], 64, m["max_length"])
    assert ids == assets["ids"]
    np.testing.assert_allclose(vecs, direct, atol=1e-5)
    # resume: only a missing shard is embedded again, and it comes back the same
    (out / shard_file(3)).unlink()
    again = embed_corpus(str(root / "enc"), str(assets["corpus"]), str(out), actors=2, cpus_per_actor=0.5,
                         shard_rows=128, log=logs.append)
    assert again["embedded_now"] == m["shards"][3]["rows"] and "(7 already done)" in logs[-1]
    np.testing.assert_allclose(_vectors(out)[1], vecs, atol=1e-6)
    with pytest.raises(ConfigError, match="holds embeddings of another model"):
        embed_corpus(str(root / "enc2"), str(assets["corpus"]), str(out), actors=1, shard_rows=128)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _section(port, *overrides):
    from negatron.serve.app import resolve_section

    return resolve_section(load_config(None, [
        f"serve.port={port}", "serve.encoder.scale.num_cpus=0.25", "serve.retriever.scale.num_cpus=0.25",
        "serve.ingress.num_cpus=0.1", *overrides]))


def test_serving_from_an_artifact_and_a_retrained_checkpoint_swap(assets):
    from ray import serve

    from negatron.serve.app import app_builder, start

    root = assets["root"]
    out = root / "emb"
    if not (out / "manifest.json").is_file():
        embed_corpus(str(root / "enc"), str(assets["corpus"]), str(out), actors=2, cpus_per_actor=0.5, shard_rows=128)
    build_index(str(out), "hnsw", str(root / "idx"), log=lambda m: None)
    # an artifact built with another model is refused before anything is deployed
    with pytest.raises(ConfigError, match="was built with model"):
        app_builder(_section(_free_port(), f"serve.encoder.path={root / 'enc2'}", f"serve.retriever.index_path={root / 'idx'}"))

    port = _free_port()
    url = start(_section(port, f"serve.encoder.path={root / 'enc'}", f"serve.retriever.index_path={root / 'idx'}"),
                blocking_wait_s=300)
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            hits = c.post("/search", json={"query": assets["texts"][42], "top_k": 3}).json()
            assert hits[0]["doc_id"] == "d42" and hits[0]["text"] == assets["texts"][42]
    finally:
        serve.shutdown()

    # `negatron serve --corpus` with watch_s: the driver indexes the corpus with the pipeline before
    # the Retriever starts, and a checkpoint retrained into the same folder is indexed the same way
    # and swapped in while /search keeps answering
    from negatron.serve.prebuild import build_artifact, watch_model

    served = root / "served"
    shutil.copytree(root / "enc", served)
    corpus = write_corpus(root / "small.parquet", assets["ids"][:80], assets["texts"][:80])
    port = _free_port()
    section = _section(port, f"serve.encoder.path={served}", f"serve.retriever.corpus={corpus}",
                       "serve.retriever.watch_s=1", f"serve.retriever.cache_dir={root / 'cache'}",
                       "serve.retriever.build_cpus_per_actor=0.5")
    logs = []
    art = build_artifact(section, log=logs.append)
    assert art.startswith(str(root / "cache" / "artifact-")) and any("pipeline actor(s)" in m for m in logs)
    assert build_artifact(section, log=logs.append) == art and "is built" in logs[-1]  # a restart embeds nothing
    url = start(section, blocking_wait_s=300)
    retriever = serve.get_deployment_handle("Retriever", section.app_name)
    first_info = retriever.info.remote().result()
    assert first_info["source"] == art and first_info["artifact"] and first_info["count"] == 80  # not embedded in the replica
    watching = threading.Event()
    watcher = threading.Thread(target=watch_model, args=(section, watching), kwargs={"log": logs.append})
    watcher.start()
    query = "return x * 3"
    new_enc = make_tiny_encoder(seed=1)
    want_new = np.argsort(-(new_enc.encode([query]) @ new_enc.encode(assets["texts"][:80]).T)[0])[:5]
    old_enc = make_tiny_encoder(seed=0)
    want_old = np.argsort(-(old_enc.encode([query]) @ old_enc.encode(assets["texts"][:80]).T)[0])[:5]
    assert list(want_new) != list(want_old)
    statuses, stop = [], threading.Event()

    def hammer():
        with httpx.Client(base_url=url, timeout=60) as c:
            while not stop.is_set():
                statuses.append(c.post("/search", json={"query": query, "top_k": 5}).status_code)

    t = threading.Thread(target=hammer)
    t.start()
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            first = [h["doc_id"] for h in c.post("/search", json={"query": query, "top_k": 5}).json()]
            assert first == [f"d{i}" for i in want_old]
            new_enc.save(served)  # "retrained into the same folder"
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                got = [h["doc_id"] for h in c.post("/search", json={"query": query, "top_k": 5}).json()]
                if got == [f"d{i}" for i in want_new]:
                    break
                time.sleep(0.5)
            else:
                pytest.fail(f"the retriever never swapped to the retrained checkpoint (still {got})")
            swapped_info = retriever.info.remote().result()
    finally:
        stop.set()
        watching.set()
        t.join()
        watcher.join()
        serve.shutdown()
    assert statuses and set(statuses) == {200}, sorted(set(statuses))
    assert any("the Retriever swaps to it" in m for m in logs), logs
    assert swapped_info["artifact"] and swapped_info["source"] != art and swapped_info["model_id"] != first_info["model_id"]


def test_eval_on_the_pipeline_equals_in_process(assets, capsys):
    """`negatron eval --actors 2` (Ray Data embedding, flat artifact) scores as the in-process
    path does; `--index` scores a prebuilt artifact, and another model's artifact is refused."""
    import json

    from negatron.cluster.cli import main
    from negatron.trainers.encoder import Encoder
    from negatron.trainers.evaluate import evaluate_encoder
    from tests.helpers import write_synthetic_task

    root = assets["root"]
    dev = str(write_synthetic_task(root / "evaltask", n_dev=50, n_distract=120) / "dev")
    enc = str(root / "enc")
    direct = evaluate_encoder(Encoder.from_pretrained(enc), dev, progress=False)
    work = root / "evalwork"
    assert main(["eval", "--model", enc, "--data", dev, "--actors", "2", "--cpus-per-actor", "0.5",
                 "--work", str(work), "--out", str(root / "m.json")]) == 0
    piped = json.loads((root / "m.json").read_text())
    assert piped["index_kind"] == "flat" and piped["num_docs"] == direct["num_docs"] == 170
    for k in ("mrr@10", "recall@1", "recall@10", "ndcg@10", "recall@100"):
        assert piped[k] == pytest.approx(direct[k], abs=1e-9), k
    assert main(["eval", "--model", enc, "--data", dev, "--index", str(work / "index_flat"),
                 "--out", str(root / "m2.json")]) == 0
    assert json.loads((root / "m2.json").read_text())["mrr@10"] == pytest.approx(direct["mrr@10"], abs=1e-9)
    assert main(["eval", "--model", str(root / "enc2"), "--data", dev, "--index", str(work / "index_flat")]) == 2
    assert "was built with model" in capsys.readouterr().err
