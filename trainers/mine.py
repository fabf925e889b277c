"""Hard-negative mining on the embedding pipeline: the distinct queries, the distinct positives
and the candidate corpus (the positives, or ``--corpus``) are embedded by ``negatron embed``'s
actor pool into shards; an index artifact is built over the candidates; the pairs are then read a
row group at a time, searched in batches and written back with ``negative_ids`` — ids only, so the
mined file stays about the size of its input, and the trainer looks their texts up in the corpus
(``data.negatives_corpus``). The driver holds the index, the hashed ids and one row group; the
vectors are memory-mapped from a work folder.

For every query, candidates from a rank window are kept that are neither its positive nor any
positive of the same query (by id or identical text). ``select_negatives`` is the pure part.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .ingest import hash_ids


def select_negatives(pos_ids: Sequence[str], pos_scores: np.ndarray, cand_rows: np.ndarray, cand_scores: np.ndarray,
                     doc_ids: Sequence[str], skip: int, take: int, margin: float | None,
                     doc_texts: Sequence[str] | None = None, pos_texts: Sequence[str] | None = None,
                     query_positive_ids: Sequence[set[str]] | None = None) -> list[list[int]]:
    """Per query, the corpus rows to use as hard negatives.

    Args:
        pos_ids: the positive's id per query (Q).
        pos_scores: the query–positive score per query (Q).
        cand_rows / cand_scores: faiss results, best first (Q×K; row -1 = none).
        doc_ids: corpus ids (a row's id).
        skip: drop the first ``skip`` candidates that are not the positive (likely unlabelled positives).
        take: then keep at most ``take``.
        margin: if set, drop a candidate scoring above ``positive score - margin``.
        doc_texts / pos_texts: when given, a candidate whose text equals the positive's is dropped too.
        query_positive_ids: per query, the ids of every positive of that query (all rows sharing its
            query_id): none of them is ever a negative.
    """
    out: list[list[int]] = []
    for q, pid in enumerate(pos_ids):
        eligible = []
        others = query_positive_ids[q] if query_positive_ids is not None else ()
        for row, score in zip(cand_rows[q], cand_scores[q]):
            if row < 0 or doc_ids[row] == pid or doc_ids[row] in others:  # never a positive of this query
                continue
            if doc_texts is not None and pos_texts is not None and doc_texts[row] == pos_texts[q]:
                continue
            eligible.append((int(row), float(score)))
        window = eligible[skip:]
        if margin is not None:
            window = [(r, s) for r, s in window if s <= pos_scores[q] - margin]
        out.append([r for r, _ in window[:take]])
    return out


def _distinct(source, id_col: str, text_col: str, out: Path) -> int:
    """Write the distinct (id, text) rows of a streamed pairs table as a corpus Parquet (doc_id, text)."""
    seen: set[int] = set()
    n = 0
    with pq.ParquetWriter(out, pa.schema([("doc_id", pa.string()), ("text", pa.string())])) as w:
        for b in range(len(source.blocks)):
            t = source.read(b)
            keys = hash_ids(t.column(id_col))
            _, first = np.unique(keys, return_index=True)
            keep = [i for i in np.sort(first) if int(keys[i]) not in seen]
            seen.update(int(keys[i]) for i in keep)
            if keep:
                idx = pa.array(keep)
                w.write_table(pa.table({"doc_id": pc.cast(t.column(id_col).take(idx), pa.string()),
                                        "text": pc.cast(t.column(text_col).take(idx), pa.string())}))
                n += len(keep)
    return n


def _vector_file(emb_dir: Path, path: Path):
    """The shards' vectors as one float32 ``.npy`` (row order), written with plain writes and read
    back a row at a time (``VectorFile``: nothing mapped, nothing held), and their ``IdIndex``."""
    import json

    from .embed import MANIFEST, shard_vectors
    from .lookup import IdIndex
    from .vector_index import VectorFile

    m = json.loads((emb_dir / MANIFEST).read_text())
    keys = np.zeros(m["count"], dtype=np.int64)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.dtype(np.float32).str, "fortran_order": False,
                                                 "shape": (m["count"], m["dim"])})
        for s in m["shards"]:
            t = pq.read_table(emb_dir / s["file"])
            f.write(np.ascontiguousarray(shard_vectors(t), dtype=np.float32).tobytes())
            keys[s["start"]:s["start"] + s["rows"]] = hash_ids(t.column("doc_id"))
            del t
            pa.default_memory_pool().release_unused()
    return VectorFile(path), IdIndex(keys)


def mine(model: str, data: str | Path, out: str | Path, k: int = 50, skip: int = 3, take: int = 30,
         margin: float | None = None, corpus: str | Path | None = None, max_length: int = 128,
         workers: int = 2, cpus_per_worker: float = 1.0, batch_size: int = 64,
         embed: Callable[[list[str], str], np.ndarray] | None = None, log=print, with_texts: bool = False,
         index_kind: str = "auto", work: str | Path | None = None, address: str | None = None) -> dict:
    """Write ``out``: the pairs of ``data`` plus a ``negative_ids`` list column (and ``negatives``
    texts with ``with_texts``).

    The candidate pool is ``corpus`` (doc_id, text) if given, else the distinct positives of ``data``
    (written beside ``out`` as ``<out>.negatives.parquet``, the file the trainer's
    ``data.negatives_corpus`` then names). ``embed(texts, desc)`` replaces the Ray pipeline (tests of
    the pure path; ``desc`` names what is embedded, and prompts are then the caller's). The
    pipeline gives queries the model's query prompt and the rest its document prompt. ``index_kind``: flat (exact), ivfpq, or auto (flat up to 2M candidates).
    ``work``: where embeddings and the index are kept (default: a temp folder, removed); give one to
    resume an interrupted run. Returns counts, timings and ``negatives_corpus``.
    """
    from negatron.cluster import storage
    from negatron.cluster.config import ConfigError
    from negatron.cluster.files import same_file

    from .embed import embed_corpus, embed_local
    from .model_io import model_id, resolve_model_path
    from .schema import open_corpus, open_pairs
    from .vector_index import build_index, load_artifact

    if take < 1 or skip < 0 or k < 1:
        raise ConfigError(f"mine: need --k >= 1, --skip >= 0, --take >= 1 (got k={k}, skip={skip}, take={take})")
    if str(out) in (str(data), str(corpus)) or same_file(out, data) or (corpus is not None and same_file(out, corpus)):
        raise ConfigError(f"mine: --out {out} is an input of this run; write the mined pairs to a new file")
    if storage.is_dir(out):
        raise ConfigError(f"mine: --out {out} is a folder; give a .parquet file path")
    if index_kind not in ("auto", "flat", "ivfpq"):
        raise ConfigError(f"mine: index kind must be auto, flat or ivfpq, got {index_kind!r}")
    if k < skip + take:
        log(f"note: k={k} < skip+take={skip + take}: fewer than {take} negatives per query")
    t0 = time.perf_counter()
    source = open_pairs(data)
    pool_corpus = open_corpus(corpus) if corpus is not None else None
    folder = resolve_model_path(model)
    mid = model_id(folder)
    tmp = None
    if work is None:
        tmp = tempfile.mkdtemp(prefix="negatron-mine-", dir=os.environ.get("NEGATRON_CACHE") or None)
    wdir = Path(work or tmp)
    wdir.mkdir(parents=True, exist_ok=True)
    try:
        stem = str(out)[:-len(".parquet")] if str(out).endswith(".parquet") else str(out)
        neg_corpus = str(corpus) if corpus is not None else stem + ".negatives.parquet"
        n_pos = _distinct(source, "positive_id", "positive", wdir / "positives.parquet")
        n_q = _distinct(source, "query_id", "query", wdir / "queries.parquet")
        pool = str(corpus) if corpus is not None else str(wdir / "positives.parquet")

        def run(name: str, path: str) -> Path:
            dst = wdir / f"emb_{name}"
            role = "query" if name == "queries" else "document"
            if embed is not None:
                if not (dst / "manifest.json").is_file():
                    embed_local(lambda texts: embed(texts, f"embed {name}"), path, str(dst),
                                {"path": str(model), "id": mid}, max_length=max_length)
            else:
                embed_corpus(str(model), path, str(dst), actors=workers, cpus_per_actor=cpus_per_worker,
                             batch_size=batch_size, max_length=max_length, log=log, address=address, role=role)
            return dst

        log(f"mine: {source.num_rows} pairs, {n_q} distinct queries, {n_pos} distinct positives, "
            f"{pool_corpus.num_rows if pool_corpus else n_pos} candidates")
        q_dir, p_dir = run("queries", str(wdir / "queries.parquet")), run("positives", str(wdir / "positives.parquet"))
        c_dir = run("corpus", pool) if corpus is not None else p_dir
        n_cand = pool_corpus.num_rows if pool_corpus else n_pos
        kind = index_kind if index_kind != "auto" else ("flat" if n_cand <= 2_000_000 else "ivfpq")
        build_index(str(c_dir), kind, str(wdir / f"index_{kind}"), corpus=pool, eval_queries=0, log=log)
        art = load_artifact(str(wdir / f"index_{kind}"))
        q_vec, q_ids = _vector_file(q_dir, wdir / "queries.npy")
        p_vec, p_ids = _vector_file(p_dir, wdir / "positives.npy")
        # every positive of each query (hashed), so no positive of a query is ever its negative
        pairs_q, pairs_p = [], []
        for b in range(len(source.blocks)):
            t = source.read(b).select(["query_id", "positive_id"])
            pairs_q.append(hash_ids(t.column("query_id")))
            pairs_p.append(hash_ids(t.column("positive_id")))
        qh, ph = np.concatenate(pairs_q), np.concatenate(pairs_p)
        by_q = np.lexsort((ph, qh))
        qh_sorted, ph_sorted = qh[by_q], ph[by_q]
        del pairs_q, pairs_p, qh, ph, by_q

        counts: list[int] = []
        local_out = Path(tempfile.mkdtemp(prefix="negatron-mined-", dir=wdir)) / "mined.parquet"
        writer = None
        from tqdm.auto import tqdm

        bar = tqdm(total=source.num_rows, desc="search", unit="pair", mininterval=2.0, file=sys.stdout)
        k_eff = min(k, n_cand)
        for b in range(len(source.blocks)):
            table = source.read(b)
            base = table.drop_columns([c for c in ("negatives", "negative_ids") if c in table.column_names])
            qhash, phash = hash_ids(table.column("query_id")), hash_ids(table.column("positive_id"))
            neg_ids_col: list[list[str]] = []
            neg_txt_col: list[list[str]] = []
            for lo in range(0, table.num_rows, 4096):
                hi = min(lo + 4096, table.num_rows)
                # every query and positive of the table was embedded: each id is found
                qv, pv = q_vec.take(q_ids.find(qhash[lo:hi])), p_vec.take(p_ids.find(phash[lo:hi]))  # c×D each
                scores, rows = art.search(qv, k_eff)  # c×k
                cand = np.unique(rows[rows >= 0])
                cand_ids = art.docs.column("doc_id").take(pa.array(cand))
                id_of = dict(zip(cand.tolist(), hash_ids(cand_ids).tolist()))
                text_of = dict(zip(cand.tolist(), hash_ids(art.docs.column("text").take(pa.array(cand))).tolist()))
                first = np.searchsorted(qh_sorted, qhash[lo:hi], side="left")
                last = np.searchsorted(qh_sorted, qhash[lo:hi], side="right")
                others = [set(ph_sorted[a:z].tolist()) for a, z in zip(first, last)]
                picked = select_negatives(phash[lo:hi].tolist(), (qv * pv).sum(1), rows, scores, id_of, skip, take,
                                          margin, text_of, hash_ids(table.column("positive").slice(lo, hi - lo)).tolist(),
                                          query_positive_ids=others)
                str_of = dict(zip(cand.tolist(), cand_ids.to_pylist()))
                neg_ids_col += [[str_of[r] for r in p] for p in picked]
                if with_texts:
                    neg_txt_col += [[art.doc(r)[1] for r in p] for p in picked]
                counts += [len(p) for p in picked]
            result = base
            if with_texts:
                result = result.append_column("negatives", pa.array(neg_txt_col, type=pa.list_(pa.string())))
            result = result.append_column("negative_ids", pa.array(neg_ids_col, type=pa.list_(pa.string())))
            if writer is None:
                writer = pq.ParquetWriter(local_out, result.schema)
            writer.write_table(result)
            bar.update(table.num_rows)
            del table, base, result
            pa.default_memory_pool().release_unused()
        bar.close()
        writer.close()
        storage.write_with(out, lambda tmp_path: shutil.copyfile(local_out, tmp_path))
        if corpus is None:
            storage.write_with(neg_corpus, lambda tmp_path: shutil.copyfile(wdir / "positives.parquet", tmp_path))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return {"pairs": source.num_rows, "corpus": n_cand, "negatives_per_query_mean": float(np.mean(counts)) if counts else 0.0,
            "queries_without_negatives": int(sum(c == 0 for c in counts)), "wall_s": round(time.perf_counter() - t0, 1),
            "out": str(out), "negatives_corpus": neg_corpus, "index": kind}
