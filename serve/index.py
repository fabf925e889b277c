"""A faiss index over a corpus Parquet, cached on disk under the encoder checkpoint's id.

The cache key hashes the encoder's weights, the corpus file and the index settings, so a new
checkpoint or an edited corpus never reuses a stale index. No Ray here: the Retriever deployment
and `bench/serve_load.py` both call :func:`load_or_build`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from negatron.cluster import storage
from negatron.trainers.model_io import model_id  # noqa: F401 - re-exported (was defined here)
from negatron.trainers.schema import CORPUS, SchemaError, check_table

INDEX_VERSION = 1


@dataclass
class CorpusIndex:
    index: faiss.Index
    doc_ids: list[str]
    texts: list[str]
    key: str
    built_s: float
    from_cache: bool

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Q×D float32 -> (scores Q×k, row indices Q×k; -1 where fewer than k docs)."""
        k = min(k, len(self.doc_ids))
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)

    def doc(self, row: int) -> tuple[str, str]:
        return self.doc_ids[row], self.texts[row]


def cache_key(encoder_id: str, corpus_bytes: bytes, settings: dict) -> str:
    """The cache key of an index: the encoder's id, the corpus bytes that were read, the settings."""
    h = hashlib.sha256()
    h.update(f"v{INDEX_VERSION}:{encoder_id}:".encode())
    h.update(corpus_bytes)
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:20]


def default_cache_root() -> Path:
    """Where indexes are cached when the corpus folder cannot be written: ``$NEGATRON_CACHE``, else
    ``$XDG_CACHE_HOME/negatron/index``, else ``~/.cache/negatron/index``."""
    if os.environ.get("NEGATRON_CACHE"):
        return Path(os.environ["NEGATRON_CACHE"]) / "index"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "negatron" / "index"


def writable_root(preferred: Path, log: Callable[[str], None]) -> Path:
    try:
        preferred.mkdir(parents=True, exist_ok=True)
        probe = preferred / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return preferred
    except OSError as e:
        fallback = default_cache_root()
        log(f"index: cannot write the cache beside the corpus ({preferred}: {e.strerror}); using {fallback} "
            "(set serve.retriever.cache_dir to choose)")
        return fallback


def make_index(emb: np.ndarray, kind: str, hnsw_m: int = 32, hnsw_ef_search: int = 64,
               ivf_nlist: int = 0, ivf_nprobe: int = 16) -> faiss.Index:
    """Inner-product index over N×D embeddings: exact, HNSW or IVF-flat (the same constructors as
    index artifacts, ``vector_index.empty_index``)."""
    from negatron.trainers.vector_index import empty_index, set_search_params

    if kind not in ("flat", "hnsw", "ivf"):
        raise ValueError(f"index kind must be flat, hnsw or ivf, got {kind!r}")
    n, d = emb.shape
    nlist = min(ivf_nlist or max(1, int(4 * math.sqrt(n))), n)
    params = {"hnsw_m": hnsw_m, "ef_search": hnsw_ef_search, "nlist": nlist, "nprobe": ivf_nprobe}
    index = empty_index(kind, d, params)
    if kind == "ivf":
        index.train(emb)
    set_search_params(index, kind, params)
    index.add(emb)
    return index


def load_or_build(corpus: str | Path, encoder_folder: str | Path, embed: Callable[[list[str]], np.ndarray],
                  kind: str = "flat", cache_dir: str | Path | None = None, log: Callable[[str], None] = print,
                  embed_settings: dict | None = None, **index_args) -> CorpusIndex:
    """Load the cached index for (encoder, corpus, settings) or embed the corpus and build it.

    Args:
        corpus: Parquet with ``doc_id`` and ``text`` (checked; a bad file raises SchemaError).
        encoder_folder: the encoder's folder (hashed for the cache key).
        embed: texts -> N×D float32 embeddings (the same function that embeds queries).
        cache_dir: cache root; default ``<corpus folder>/.negatron_index``, or ``default_cache_root()``
            when the corpus folder is read-only.
        embed_settings: whatever else changes the embeddings (e.g. the token limit); part of the key.
    """
    t0 = time.perf_counter()
    corpus = str(corpus)
    try:
        raw = storage.read_bytes(corpus)  # read once: the key hashes exactly the bytes the index is built from
    except storage.StorageError as e:
        if storage.exists(corpus):
            raise SchemaError(str(e)) from None
        raw = None  # check_table names the missing file
    table = check_table(corpus, CORPUS, data=raw)
    doc_ids = [str(x) for x in table.column("doc_id").to_pylist()]
    texts = table.column("text").to_pylist()
    settings = {"kind": kind, **index_args, **(embed_settings or {})}
    key = cache_key(model_id(encoder_folder), raw, settings)
    del raw
    # an explicit cache_dir (a folder or a URI) is used as given; the default is beside a local
    # corpus (falling back when read-only), and the local cache for a corpus on an object store
    if cache_dir:
        root: Path | str = storage.folder(cache_dir)
    elif storage.is_remote(corpus):
        root = default_cache_root()
    else:
        root = writable_root(Path(storage.resolve(corpus)).parent / ".negatron_index", log)
    folder = storage.sub(root, key)
    index_file, meta_file = storage.sub(folder, "index.faiss"), storage.sub(folder, "meta.json")
    if storage.is_file(index_file) and storage.is_file(meta_file):
        try:
            index = faiss.deserialize_index(np.frombuffer(storage.read_bytes(index_file), dtype=np.uint8))
            if index.ntotal == len(doc_ids):
                log(f"index: loaded {index.ntotal} docs from cache {storage.redact(folder)}")
                return CorpusIndex(index, doc_ids, texts, key, time.perf_counter() - t0, True)
            log(f"index: cache {storage.redact(folder)} holds {index.ntotal} docs, corpus has {len(doc_ids)}: rebuilding")
        except RuntimeError as e:  # a truncated or corrupt cache file: rebuild rather than fail
            log(f"index: cache {storage.redact(folder)} unreadable ({e}): rebuilding")
    log(f"index: embedding {len(texts)} docs with {encoder_folder}")
    emb = np.ascontiguousarray(embed(texts), dtype=np.float32)
    index = make_index(emb, kind, **index_args)  # embed_settings are not index parameters
    # atomic (temp file + rename, or one PUT): a crash never leaves a half-written index
    storage.write_bytes(index_file, faiss.serialize_index(index).tobytes())
    storage.write_json(meta_file, {"corpus": storage.redact(corpus), "encoder": str(encoder_folder),
                                   "docs": len(doc_ids), "dim": int(emb.shape[1]), **settings})
    built = time.perf_counter() - t0
    log(f"index: built {kind} index over {len(doc_ids)} docs in {built:.1f}s -> {storage.redact(folder)}")
    return CorpusIndex(index, doc_ids, texts, key, built, False)


def write_corpus(path: str | Path, doc_ids: list[str], texts: list[str]) -> Path:
    """Write a corpus Parquet (doc_id, text)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"doc_id": doc_ids, "text": texts}), path)
    return path
