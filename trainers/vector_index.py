"""Index artifacts: a faiss index built from the embedding pipeline's shards, with its doc ids and
texts, that evaluation, mining and serving load instead of embedding a corpus themselves.

**Build** (``build_index``) with bounded memory: trained kinds (``ivf``, ``ivfpq``) are trained on a
seeded sample of the vectors, then every kind is filled shard by shard; the driver holds the
index, the training sample and one shard, never the whole matrix. For approximate kinds a seeded
sample of held-out corpus vectors (not in the training sample) is searched both ways and recall@10
against exact search is reported — the vector itself is excluded from both result lists, so it is
recall of its true neighbours. The exact top-10 is computed shard by shard too.

**Artifact** (a folder or URI)::

    index.faiss   the faiss index (inner product; rows in shard order)
    docs.arrow    Arrow IPC file: doc_id, text — memory-mapped by the server, read by row
    index.json    kind, settings, count, dim, bytes, the model's content id, the corpus, recall

    vectors.f16.npy   ivfpq only: every vector in float16, rows read on demand for re-scoring

Kinds: ``flat`` (exact), ``hnsw`` (graph), ``ivf`` (IVF-Flat), ``ivfpq`` (IVF with product
quantization: ``pq_m`` bytes per vector in memory, ``4·D / pq_m`` times smaller than flat).
Product quantization alone loses recall (0.83 recall@10 at 4 dimensions per byte on the
benchmark's clustered vectors), so an ivfpq search takes ``refine`` × k candidates from the
compressed index and re-scores them exactly from the float16 vectors on disk; only those rows are
read (``pread``; the OS page cache keeps hot ones), so the resident index stays the compressed one.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from negatron.cluster import storage
from negatron.cluster.config import ConfigError

from .embed import MANIFEST, open_parquet, shard_vectors

KINDS = ("flat", "hnsw", "ivf", "ivfpq")
INDEX_FILE, DOCS_FILE, META_FILE, VECTORS_FILE = "index.faiss", "docs.arrow", "index.json", "vectors.f16.npy"
ARTIFACT_VERSION = 1


def read_manifest(embeddings: str) -> dict[str, Any]:
    """The manifest of a finished ``negatron embed`` folder.

    Raises:
        ConfigError: no manifest (not an embeddings folder, or a run that has not finished).
    """
    path = storage.join(embeddings, MANIFEST)
    if not storage.is_file(path):
        raise ConfigError(f"{storage.redact(embeddings)}: no {MANIFEST} (not a `negatron embed` output, or the "
                          "run has not finished: run the same `negatron embed` again to complete it)")
    m = storage.read_json(path)
    if not m.get("dim") or not m.get("shards"):
        raise ConfigError(f"{storage.redact(path)}: incomplete manifest (no dim or shards)")
    return m


def iter_shards(embeddings: str, manifest: dict, columns: list[str] | None = None):
    """(shard record, table) one shard at a time, in row order; Arrow's freed buffers are handed
    back to the OS after each, so memory stays at one shard."""
    for s in manifest["shards"]:
        path = storage.join(embeddings, s["file"])
        try:
            table = open_parquet(path).read(columns=columns)
        except Exception as e:  # noqa: BLE001 - one line naming the shard
            raise storage.error(path, e, "cannot read the embeddings shard") from None
        yield s, table
        del table
        pa.default_memory_pool().release_unused()


class VectorFile:
    """Rows of an N×D float16 or float32 ``.npy`` file read on demand with ``pread`` (no memory
    map: the reader's memory holds only the rows asked for; the OS page cache keeps hot rows)."""

    def __init__(self, path: str | Path):
        self.fd = os.open(str(path), os.O_RDONLY)
        with open(path, "rb") as f:
            np.lib.format.read_magic(f)
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            self.offset = f.tell()
        if dtype not in (np.float16, np.float32) or len(shape) != 2:
            os.close(self.fd)
            raise ValueError(f"{path}: expected a float16 or float32 N×D array, got {dtype} {shape}")
        self.shape, self.dtype = shape, np.dtype(dtype)
        self.row_bytes = self.dtype.itemsize * shape[1]

    def take(self, rows: np.ndarray) -> np.ndarray:
        """float32 len(rows)×D, in the order of ``rows``."""
        out = np.empty((len(rows), self.shape[1]), dtype=self.dtype)
        for i, r in enumerate(rows):
            out[i] = np.frombuffer(os.pread(self.fd, self.row_bytes, self.offset + int(r) * self.row_bytes), self.dtype)
        return out.astype(np.float32, copy=False)

    def close(self) -> None:
        os.close(self.fd)

    def __del__(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


def sample_rows(manifest: dict, n: int, seed: int) -> np.ndarray:
    """``n`` distinct global rows, seeded, sorted."""
    total = int(manifest["count"])
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(total, size=min(n, total), replace=False))


def gather_rows(embeddings: str, manifest: dict, rows: np.ndarray) -> np.ndarray:
    """The vectors of sorted global ``rows``, read shard by shard (only shards that hold one)."""
    d = int(manifest["dim"])
    out = np.zeros((len(rows), d), dtype=np.float32)
    for s in manifest["shards"]:
        lo, hi = np.searchsorted(rows, [s["start"], s["start"] + s["rows"]])
        if hi > lo:
            table = open_parquet(storage.join(embeddings, s["file"])).read(columns=["embedding"])
            out[lo:hi] = shard_vectors(table)[rows[lo:hi] - s["start"]]
            del table
            pa.default_memory_pool().release_unused()
    return out


class RowReader:
    """Consecutive row ranges of a ParquetSource, decoding each block (row group) once."""

    def __init__(self, source):
        self.source, self.cached = source, (-1, None)

    def _block(self, i: int) -> pa.Table:
        if self.cached[0] != i:
            self.cached = (i, self.source.read(i))
        return self.cached[1]

    def read(self, start: int, count: int) -> pa.Table:
        parts, row, end = [], start, start + count
        while row < end:
            b = int(self.source.block_of(np.array([row]))[0])
            blk = self.source.blocks[b]
            take = min(end, blk.start + blk.rows) - row
            parts.append(self._block(b).slice(row - blk.start, take))
            row += take
        return pa.concat_tables(parts) if len(parts) > 1 else parts[0]


def sample_cap(d: int) -> int:
    """Most training vectors: 128 MiB of float32 (87,381 at D = 384), at most 262,144 — faiss's
    training holds about three times its sample, and a build should fit in 1 GiB whatever N is."""
    return min(262_144, (128 << 20) // (4 * d))


def default_params(kind: str, n: int, d: int) -> dict[str, int]:
    p: dict[str, int] = {}
    if kind in ("ivf", "ivfpq"):
        p["nlist"] = max(1, min(int(4 * math.sqrt(n)), sample_cap(d) // 39, n // 39 or 1))
        p["nprobe"] = 16 if kind == "ivf" else 32
    if kind == "ivfpq":
        # candidates re-scored exactly per result wanted, from float16 vectors kept on disk
        p["refine"] = 10
        # 4 dimensions per sub-quantizer, 8 bits each: D/4 bytes per vector, 16x less than flat
        p["pq_m"] = next(m for m in (d // 4, d // 2, d // 8, d) if m >= 1 and d % m == 0)
    if kind == "hnsw":
        p["hnsw_m"], p["ef_search"] = 32, 64
    return p


def empty_index(kind: str, d: int, params: dict[str, int]):
    """An inner-product index of ``kind`` (untrained for ivf/ivfpq)."""
    import faiss

    if kind == "flat":
        return faiss.IndexFlatIP(d)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, params["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = params["ef_search"]
        return index
    if kind == "ivf":
        return faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, params["nlist"], faiss.METRIC_INNER_PRODUCT)
    if kind == "ivfpq":
        if d % params["pq_m"]:
            raise ConfigError(f"index: pq_m={params['pq_m']} must divide the dimension {d}")
        return faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, params["nlist"], params["pq_m"], 8, faiss.METRIC_INNER_PRODUCT)
    raise ConfigError(f"index kind must be one of {', '.join(KINDS)}, got {kind!r}")


def set_search_params(index, kind: str, params: dict[str, int]) -> None:
    import faiss

    if kind in ("ivf", "ivfpq"):
        faiss.extract_index_ivf(index).nprobe = min(params["nprobe"], params["nlist"])
    if kind == "hnsw":
        index.hnsw.efSearch = params["ef_search"]


def exact_topk(embeddings: str, manifest: dict, queries: np.ndarray, k: int, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-``k`` of ``queries`` over every shard, ``chunk`` vectors at a time."""
    q = len(queries)
    best_s = np.full((q, k), -np.inf, dtype=np.float32)
    best_r = np.full((q, k), -1, dtype=np.int64)
    for s, table in iter_shards(embeddings, manifest, ["embedding"]):
        vecs = shard_vectors(table)
        for lo in range(0, len(vecs), chunk):
            scores = queries @ vecs[lo:lo + chunk].T  # Q×c
            kk = min(k, scores.shape[1])
            top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]  # Q×kk
            cand_s = np.concatenate([best_s, np.take_along_axis(scores, top, 1)], 1)  # Q×(k+kk)
            cand_r = np.concatenate([best_r, top + s["start"] + lo], 1)
            keep = np.argpartition(-cand_s, k - 1, axis=1)[:, :k]
            best_s, best_r = np.take_along_axis(cand_s, keep, 1), np.take_along_axis(cand_r, keep, 1)
    order = np.argsort(-best_s, axis=1)
    return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_r, order, 1)


def refine(index, vectors: "VectorFile | None", queries: np.ndarray, k: int, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Search ``index`` for ``k·factor`` candidates and re-score them exactly from ``vectors`` (the
    float16 file: only the candidates' rows are read); ``factor`` <= 1 or no vectors: the index's
    own top ``k``."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if vectors is None or factor <= 1:
        return index.search(queries, k)
    cand_s, cand_r = index.search(queries, k * factor)  # Q×kf
    out_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    out_r = np.full((len(queries), k), -1, dtype=np.int64)
    for i, (q, rows) in enumerate(zip(queries, cand_r)):
        rows = rows[rows >= 0]
        exact = vectors.take(np.sort(rows)) @ q  # c: read in file order
        order = np.argsort(-exact)[:k]
        out_s[i, :len(order)], out_r[i, :len(order)] = exact[order], np.sort(rows)[order]
    return out_s, out_r


def recall_at(approx: np.ndarray, exact: np.ndarray, self_rows: np.ndarray, k: int) -> float:
    """Mean share of each query's exact top-k (itself excluded) found in its approximate top-k."""
    hits = []
    for a, e, me in zip(approx, exact, self_rows):
        truth = [r for r in e if r != me and r >= 0][:k]
        found = set(r for r in a if r != me and r >= 0)
        if truth:
            hits.append(len(found.intersection(truth)) / len(truth))
    return float(np.mean(hits)) if hits else 1.0


def build_index(embeddings: str, kind: str, out: str, params: dict[str, int] | None = None,
                train_size: int = 0, eval_queries: int = 1000, seed: int = 0, corpus: str | None = None,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build an index artifact in ``out`` from the shards in ``embeddings``; returns ``index.json``.

    Args:
        params: nlist / nprobe / pq_m / hnsw_m / ef_search over the kind's defaults.
        train_size: vectors to train ivf/ivfpq on (0 = 40 per list, at most ``sample_cap(D)``).
        eval_queries: held-out queries for the recall report of approximate kinds (0 = none).
        corpus: where the texts are (default: the corpus the embeddings were made from).
    """
    import faiss

    from .ingest import ParquetSource

    if kind not in KINDS:
        raise ConfigError(f"index kind must be one of {', '.join(KINDS)}, got {kind!r}")
    t0 = time.perf_counter()
    m = read_manifest(embeddings)
    n, d = int(m["count"]), int(m["dim"])
    p = {**default_params(kind, n, d), **{k: v for k, v in (params or {}).items() if v}}
    index = empty_index(kind, d, p)
    trained_on = 0
    held: np.ndarray = np.zeros(0, dtype=np.int64)
    if kind in ("ivf", "ivfpq"):
        want = train_size or min(n, max(40 * p["nlist"], 10_000), sample_cap(d))  # faiss asks >= 39 per list
        picked = sample_rows(m, min(n, want + eval_queries), seed)
        rng = np.random.default_rng(seed + 1)
        is_held = np.zeros(len(picked), dtype=bool)
        is_held[rng.choice(len(picked), size=min(eval_queries, max(0, len(picked) - p["nlist"])), replace=False)] = True
        train_rows, held = picked[~is_held], picked[is_held]
        log(f"index: training {kind} (nlist {p['nlist']}" + (f", pq_m {p['pq_m']}" if kind == "ivfpq" else "")
            + f") on {len(train_rows)} sampled vectors")
        sample = gather_rows(embeddings, m, train_rows)
        index.train(sample)
        trained_on = len(sample)
        del sample
    elif kind == "hnsw" and eval_queries:
        held = sample_rows(m, eval_queries, seed)
    set_search_params(index, kind, p)

    texts_from = corpus or (m["corpus"]["files"][0] if len(m["corpus"]["files"]) == 1 else m["corpus"]["path"])
    src = None
    if texts_from:
        try:
            src = ParquetSource(texts_from, columns=["doc_id", "text"])
        except storage.StorageError as e:
            raise ConfigError(f"index: cannot read the corpus texts at {storage.redact(texts_from)} ({e}); "
                              "give --corpus") from None
        if src.num_rows != n:
            raise ConfigError(f"index: the corpus {storage.redact(texts_from)} has {src.num_rows} rows, the embeddings "
                              f"{n}: not the corpus they were made from")
    with tempfile.TemporaryDirectory(prefix="negatron-index-") as tmp:
        local = Path(storage.resolve(out)) if not storage.is_remote(out) else Path(tmp) / "artifact"
        local.mkdir(parents=True, exist_ok=True)
        docs_tmp = local / (DOCS_FILE + ".tmp")
        schema = pa.schema([("doc_id", pa.string()), ("text", pa.large_string())])
        from tqdm.auto import tqdm

        reader = RowReader(src) if src is not None else None
        refine_factor = int(p.get("refine") or 0)
        # written with plain file writes, not a memmap: mapped dirty pages would count in this
        # process's memory; shards come in row order
        vec_file = open(local / (VECTORS_FILE + ".tmp"), "wb") if refine_factor > 1 else None
        if vec_file is not None:
            np.lib.format.write_array_header_1_0(vec_file, {"descr": np.dtype(np.float16).str, "fortran_order": False,
                                                            "shape": (n, d)})
        bar = tqdm(total=n, desc=f"index {kind}", unit="vec", mininterval=2.0, file=sys.stdout)
        with pa.OSFile(str(docs_tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for s, table in iter_shards(embeddings, m, ["doc_id", "embedding"]):
                vecs = shard_vectors(table)
                for lo in range(0, len(vecs), 16384):  # bounded scratch memory inside faiss
                    index.add(vecs[lo:lo + 16384])
                if vec_file is not None:
                    vec_file.write(vecs.astype(np.float16).tobytes())
                texts = reader.read(s["start"], s["rows"]).column("text") if reader is not None else pa.nulls(table.num_rows, pa.large_string())
                ids = table.column("doc_id")
                writer.write_table(pa.table({"doc_id": ids, "text": texts.cast(pa.large_string())}, schema=schema))
                bar.update(table.num_rows)
        bar.close()
        vectors = None
        if vec_file is not None:
            vec_file.close()
            os.replace(local / (VECTORS_FILE + ".tmp"), local / VECTORS_FILE)
            vectors = VectorFile(local / VECTORS_FILE)
        elif (local / VECTORS_FILE).exists():
            (local / VECTORS_FILE).unlink()  # an earlier build's vectors in the same folder
        recall = None
        if len(held) and kind != "flat":
            queries = gather_rows(embeddings, m, held)
            k = 10
            _, exact_r = exact_topk(embeddings, m, queries, k + 1)
            _, approx_r = refine(index, vectors, queries, k + 1, refine_factor)
            recall = round(recall_at(approx_r, exact_r, held, k), 4)
            log(f"index: recall@10 against exact search on {len(held)} held-out corpus vectors: {recall:.4f}")
        if vectors is not None:
            vectors.close()
        faiss.write_index(index, str(local / (INDEX_FILE + ".tmp")))
        os.replace(local / (INDEX_FILE + ".tmp"), local / INDEX_FILE)
        os.replace(docs_tmp, local / DOCS_FILE)
        meta = {"version": ARTIFACT_VERSION, "kind": kind, "params": p, "count": n, "dim": d,
                "index_bytes": (local / INDEX_FILE).stat().st_size, "flat_bytes": n * d * 4,
                "vectors_on_disk_bytes": (local / VECTORS_FILE).stat().st_size if refine_factor > 1 else 0,
                "model": m["model"], "corpus": m["corpus"], "max_length": m["max_length"],
                "normalized": m.get("normalized", True), "embeddings": storage.redact(embeddings),
                "trained_on": trained_on, "recall_at_10": recall, "recall_queries": int(len(held)) if recall is not None else 0,
                "texts": src is not None, "build_s": round(time.perf_counter() - t0, 1)}
        (local / META_FILE).write_text(json.dumps(meta, indent=2))
        if storage.is_remote(out):
            storage.put_folder(local, out)
    return meta


@dataclass
class Artifact:
    """A loaded index artifact: the faiss index, and doc ids and texts by row (memory-mapped)."""

    index: Any
    docs: pa.Table
    meta: dict[str, Any]
    folder: Path
    vectors: VectorFile | None = None  # float16 N×D on disk (ivfpq re-scoring)

    @property
    def count(self) -> int:
        return int(self.meta["count"])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Q×D float32 -> (scores Q×k, rows Q×k; -1 where fewer than k)."""
        return refine(self.index, self.vectors, queries, min(k, self.count), int(self.meta["params"].get("refine") or 0))

    def doc(self, row: int) -> tuple[str, str | None]:
        return self.docs.column("doc_id")[row].as_py(), self.docs.column("text")[row].as_py()


def load_artifact(path: str) -> Artifact:
    """Load an index artifact (a folder, or a URI fetched once into the local cache).

    Raises:
        ConfigError: not an artifact, or a corrupt one (named).
    """
    import faiss

    try:
        folder = storage.local_folder(path) if storage.is_remote(path) else Path(storage.resolve(path))
    except storage.StorageError as e:
        raise ConfigError(f"index: {e}") from None
    meta_file = folder / META_FILE
    if not meta_file.is_file():
        raise ConfigError(f"{storage.redact(path)}: not an index artifact (no {META_FILE}; build one with "
                          "`negatron index build`)")
    try:
        meta = json.loads(meta_file.read_text())
        index = faiss.read_index(str(folder / INDEX_FILE))
        docs = pa.ipc.open_file(pa.memory_map(str(folder / DOCS_FILE))).read_all()
        refine_factor = int(meta["params"].get("refine") or 0)
        vectors = VectorFile(folder / VECTORS_FILE) if refine_factor > 1 else None
    except Exception as e:  # noqa: BLE001 - faiss/arrow raise RuntimeError/ArrowInvalid
        raise ConfigError(f"{storage.redact(path)}: corrupt index artifact ({str(e).strip().splitlines()[0][:200]})") from None
    if index.ntotal != meta.get("count") or docs.num_rows != meta.get("count"):
        raise ConfigError(f"{storage.redact(path)}: corrupt index artifact (index {index.ntotal}, docs {docs.num_rows}, "
                          f"index.json {meta.get('count')} rows)")
    set_search_params(index, meta["kind"], meta["params"])
    if vectors is not None and vectors.shape != (index.ntotal, meta["dim"]):
        raise ConfigError(f"{storage.redact(path)}: corrupt index artifact ({VECTORS_FILE} is {vectors.shape}, "
                          f"expected {(index.ntotal, meta['dim'])})")
    return Artifact(index, docs, meta, folder, vectors)
