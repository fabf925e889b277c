"""`negatron serve --corpus`: the Retriever's index built by the embedding pipeline on the driver.

With a corpus and no ``serve.retriever.index_path``, ``negatron serve`` embeds the corpus with
the Ray Data actor pool of ``negatron embed`` (``serve.retriever.build_actors`` actors) and builds
an index artifact with ``negatron index build`` before any replica starts; the Retriever then loads
the artifact (memory-mapped texts) instead of embedding the corpus itself. Artifacts are cached
by (model content id, corpus fingerprint, index settings) under the index cache, so a restart
loads the one it built. With ``serve.retriever.watch_s``, the driver also watches the model folder
and, when a checkpoint is retrained into it, builds the new model's artifact the same way; the
Retriever finds it by the same key and swaps while its old index answers.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path
from typing import Callable

from negatron.cluster import storage
from negatron.cluster.config import ConfigError
from negatron.cluster.serve_config import ServeSection

ARTIFACT_VERSION = 1


def uses_pipeline(section: ServeSection) -> bool:
    """Whether the driver builds the Retriever's index (a corpus, no artifact, build_actors > 0)."""
    r = section.retriever
    return bool(r.corpus) and not r.index_path and r.build_actors > 0


def _index_params(section: ServeSection) -> dict[str, int]:
    r = section.retriever
    return {"hnsw_m": r.hnsw_m, "ef_search": r.hnsw_ef_search, "nlist": r.ivf_nlist, "nprobe": r.ivf_nprobe}


def _cache_root(section: ServeSection, log: Callable[[str], None]) -> str:
    from .index import writable_root, default_cache_root

    r = section.retriever
    if r.cache_dir:
        return r.cache_dir
    if storage.is_remote(r.corpus):
        return str(default_cache_root())
    return str(writable_root(Path(storage.resolve(r.corpus)).parent / ".negatron_index", log))


def artifact_spec(section: ServeSection, log: Callable[[str], None] = print) -> dict:
    """Where the pipeline's artifacts for this corpus and these settings live (one per model)."""
    r = section.retriever
    return {"root": _cache_root(section, log), "corpus": r.corpus, "kind": r.index,
            "params": _index_params(section), "max_length": section.encoder.max_length}


def artifact_path(spec: dict, model_content_id: str) -> str:
    """The artifact folder of ``spec`` for the model with this content id (built or not): keyed by
    the model, the corpus fingerprint (its Parquet metadata) and the index settings, so the driver
    that builds it and a Retriever replica that looks for it agree."""
    from negatron.trainers.embed import corpus_fingerprint
    from negatron.trainers.schema import open_corpus

    settings = {"v": ARTIFACT_VERSION, "model": model_content_id, "corpus": corpus_fingerprint(open_corpus(spec["corpus"])),
                "kind": spec["kind"], "params": spec["params"], "max_length": spec["max_length"]}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
    return storage.join(spec["root"], f"artifact-{key}")


def is_built(path: str) -> bool:
    from negatron.trainers.vector_index import META_FILE

    return storage.is_file(storage.join(path, META_FILE))


def build_artifact(section: ServeSection, address: str | None = None, log: Callable[[str], None] = print) -> str:
    """The served model's artifact for ``serve.retriever.corpus``: found in the cache when built
    before, else embedded by the actor pool and indexed (the embeddings are removed once the
    artifact is written). Returns its folder."""
    from negatron.trainers.embed import embed_corpus
    from negatron.trainers.model_io import model_id, resolve_model_path
    from negatron.trainers.vector_index import build_index

    r = section.retriever
    try:
        spec = artifact_spec(section, log)
        art = artifact_path(spec, model_id(resolve_model_path(section.encoder.path)))
        if is_built(art):
            log(f"negatron serve: the index artifact for this model and corpus is built: {storage.redact(art)}")
            return art
        emb = art.replace("artifact-", "embeddings-")
        log(f"negatron serve: embedding {storage.redact(r.corpus)} with {r.build_actors} pipeline actor(s), then a "
            f"{r.index} index, before the Retriever starts")
        embed_corpus(section.encoder.path, r.corpus, emb, actors=r.build_actors, cpus_per_actor=r.build_cpus_per_actor,
                     gpus_per_actor=r.build_gpus_per_actor, max_length=section.encoder.max_length, log=log,
                     address=address)
        build_index(emb, r.index, art, params=_index_params(section), corpus=r.corpus,
                    eval_queries=0 if r.index == "flat" else 1000, log=log)
    except storage.StorageError as e:
        raise ConfigError(f"serve.retriever.corpus: {e}") from None
    if not storage.is_remote(emb):
        shutil.rmtree(storage.resolve(emb), ignore_errors=True)
    return art


def watch_model(section: ServeSection, stop: threading.Event, address: str | None = None,
                log: Callable[[str], None] = print) -> None:
    """Until ``stop``: every ``serve.retriever.watch_s`` seconds, hash the served model folder; when
    it changed, build the new model's artifact. The Retriever, watching the same folder, finds it
    by the same key and swaps while its old index answers. Errors are logged; the running index
    keeps answering."""
    from negatron.trainers.model_io import model_id, resolve_model_path

    period = section.retriever.watch_s
    if not period or not uses_pipeline(section):
        stop.wait()
        return
    current = model_id(resolve_model_path(section.encoder.path))
    while not stop.wait(period):
        try:
            now = model_id(resolve_model_path(section.encoder.path))
            if now != current:
                log(f"negatron serve: the model folder changed ({current} -> {now}); indexing the corpus with the pipeline")
                art = build_artifact(section, address, log)
                current = now
                log(f"negatron serve: built {storage.redact(art)}; the Retriever swaps to it")
        except Exception as e:  # noqa: BLE001 - the old index keeps answering
            log(f"negatron serve: keeping the current index: {e}")
