"""Retrieval evaluation: embed corpus and queries, exact faiss inner-product search, metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np

from .image_encoder import ImageEncoder, decode_images
from .metrics import METRIC_KEYS, alignment, evaluate_run, uniformity
from .schema import EvalData, check_eval_dir


def exact_search(corpus_emb: np.ndarray, query_emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k: (scores Q×k, indices Q×k). Embeddings are float32 rows."""
    if corpus_emb.ndim != 2 or query_emb.ndim != 2 or corpus_emb.shape[1] != query_emb.shape[1]:
        raise ValueError(f"embedding shapes do not match: corpus {corpus_emb.shape}, queries {query_emb.shape}")
    index = faiss.IndexFlatIP(corpus_emb.shape[1])
    index.add(np.ascontiguousarray(corpus_emb, dtype=np.float32))
    k = min(k, corpus_emb.shape[0])
    return index.search(np.ascontiguousarray(query_emb, dtype=np.float32), k)


DEV_SEED = 0  # the dev subsample's seed: fixed, so every trial and seed is scored on the same rows


def _subset(data: EvalData, max_queries: int, max_docs: int, seed: int = DEV_SEED):
    """(qids, query texts, doc ids, doc texts, qrels) with the dev-check subsampling applied.

    ``max_queries`` judged queries drawn with ``seed``; the corpus keeps every judged document of
    those queries plus ``max_docs`` minus that many other documents drawn with ``seed``. Rows keep
    their file order, and only the kept texts become Python strings.
    """
    rng = np.random.default_rng(seed)
    qrels = data.relevant()
    qids = [str(q) for q in data.queries.column("query_id").to_pylist()]
    keep = [i for i, q in enumerate(qids) if q in qrels]
    if max_queries and len(keep) > max_queries:
        keep = sorted(rng.choice(keep, max_queries, replace=False).tolist())
    qids = [qids[i] for i in keep]
    qtexts = data.queries.column("text").take(keep).to_pylist()
    doc_ids = [str(d) for d in data.corpus.column("doc_id").to_pylist()]
    texts = data.corpus.column("text")
    if max_docs and len(doc_ids) > max_docs:
        judged = {d for q in qids for d in qrels[q]}
        is_judged = np.fromiter((d in judged for d in doc_ids), dtype=bool, count=len(doc_ids))
        others = np.flatnonzero(~is_judged)
        room = min(len(others), max(0, max_docs - int(is_judged.sum())))
        rows = np.sort(np.concatenate([np.flatnonzero(is_judged), rng.choice(others, room, replace=False)]))
        doc_ids = [doc_ids[i] for i in rows]
        texts = texts.take(rows)
    return qids, qtexts, doc_ids, texts.to_pylist(), {q: qrels[q] for q in qids}


def encode_shared(encoder, texts: Sequence[str], batch_size: int, max_length: int | None = None,
                  progress: str | None = None, role: str | None = None):
    """Every training worker embeds a contiguous 1/N of ``texts``; rank 0 gets all N×D rows in
    order, the other ranks None. One process (no process group): the whole array, with a
    ``progress`` bar when named."""
    from . import distributed as D

    world, rank = D.world_size(), D.rank()
    bounds = np.linspace(0, len(texts), world + 1).astype(int)
    mine = encoder.encode(texts[bounds[rank]:bounds[rank + 1]], batch_size=batch_size, max_length=max_length,
                          progress=progress if world == 1 else None, role=role)
    return D.gather_rows(mine, np.diff(bounds).tolist())


def _retrieve(encoder, qtexts, docs, batch_size, top_k, query_max_length, progress):
    t0 = time.perf_counter()
    doc_emb = encoder.encode(docs, batch_size=batch_size, progress="corpus" if progress else None,
                             role="document")
    t1 = time.perf_counter()
    q_emb = encoder.encode(qtexts, batch_size=batch_size, max_length=query_max_length,
                           progress="queries" if progress else None, role="query")
    t2 = time.perf_counter()
    scores, idx = exact_search(doc_emb, q_emb, top_k)
    t3 = time.perf_counter()
    return scores, idx, {"encode_corpus_s": round(t1 - t0, 3), "encode_queries_s": round(t2 - t1, 3),
                 "search_s": round(t3 - t2, 4)}


class DevRetrieval:
    """A bi-encoder's dev check shared by the training workers: the subsample is drawn once (the
    same on every rank), each check embeds 1/N of the corpus and of the queries per worker, and
    rank 0 gathers the rows, searches exactly and scores. Construct and call on every rank."""

    def __init__(self, data: EvalData | str, max_queries: int = 0, max_docs: int = 0, batch_size: int = 64,
                 top_k: int = 100, query_max_length: int | None = None, progress: bool = False):
        if isinstance(data, str):
            data = check_eval_dir(data)
        self.qids, self.qtexts, self.doc_ids, self.docs, self.qrels = _subset(data, max_queries, max_docs)
        self.batch_size, self.top_k, self.query_max_length = batch_size, top_k, query_max_length
        self.progress = progress

    def _geometry(self, q_emb: np.ndarray, doc_emb: np.ndarray) -> dict[str, float]:
        """Alignment of the (query, relevant document) pairs and uniformity of the corpus (Wang &
        Isola; both lower-is-better), from the embeddings the check made anyway."""
        row = {d: i for i, d in enumerate(self.doc_ids)}
        pairs = [(qi, row[d]) for qi, q in enumerate(self.qids) for d in self.qrels[q] if d in row]
        out = {}
        if pairs:
            qi, di = map(np.asarray, zip(*pairs))
            out["alignment"] = alignment(q_emb[qi], doc_emb[di])
        if len(doc_emb) >= 2:
            out["uniformity"] = uniformity(doc_emb)
        return out

    def evaluate(self, encoder) -> dict[str, float] | None:
        """Metrics on rank 0 (with ``num_docs``, ``alignment``, ``uniformity`` and the timings), None
        on the other ranks."""
        t0 = time.perf_counter()
        doc_emb = encode_shared(encoder, self.docs, self.batch_size, progress="corpus" if self.progress else None,
                                role="document")
        t1 = time.perf_counter()
        q_emb = encode_shared(encoder, self.qtexts, self.batch_size, self.query_max_length,
                              progress="queries" if self.progress else None, role="query")
        t2 = time.perf_counter()
        if doc_emb is None:
            return None
        _, idx = exact_search(doc_emb, q_emb, self.top_k)
        t3 = time.perf_counter()
        run = {q: [self.doc_ids[j] for j in row if j >= 0] for q, row in zip(self.qids, idx)}
        metrics = evaluate_run(run, self.qrels)
        metrics.update(self._geometry(q_emb, doc_emb))
        metrics.update({"num_docs": len(self.docs), "encode_corpus_s": round(t1 - t0, 3),
                        "encode_queries_s": round(t2 - t1, 3), "search_s": round(t3 - t2, 4),
                        "check_s": round(time.perf_counter() - t0, 3)})
        return metrics


def evaluate_encoder(encoder, data: EvalData | str, batch_size: int = 64, top_k: int = 100,
                     max_queries: int = 0, query_max_length: int | None = None,
                     progress: bool = True, max_docs: int = 0) -> dict[str, float]:
    """Recall@1/10/100, MRR@10, nDCG@10 of ``encoder`` on an eval folder (or loaded EvalData).

    ``max_queries``/``max_docs`` (0 = all) subsample, seeded: ``max_queries`` judged queries, and
    the corpus keeps every judged document of those queries plus other documents up to ``max_docs``.

    Returns the METRIC_KEYS plus ``num_queries``, ``num_docs`` and timings in seconds.
    """
    return DevRetrieval(data, max_queries=max_queries, max_docs=max_docs, batch_size=batch_size, top_k=top_k,
                        query_max_length=query_max_length, progress=progress).evaluate(encoder)


PIPELINE_ABOVE = 100_000  # `negatron eval` embeds larger corpora with the Ray Data pipeline


def evaluate_pipeline(model: str, data: str, work: str | None = None, index: str | None = None,
                      actors: int = 2, cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0,
                      batch_size: int = 64, max_length: int | None = None, kind: str = "flat", top_k: int = 100,
                      address: str | None = None, log=print) -> dict[str, float]:
    """Retrieval metrics over a corpus of any size: the corpus is embedded by the actor pool of
    ``negatron embed`` (resumable in ``work``), indexed by ``negatron index build`` (``kind``;
    flat is exact) and searched; or ``index`` names an artifact built for this model already. Only
    the queries and qrels are held in memory; the corpus is read a row group at a time.

    Returns what ``evaluate_encoder`` returns, plus ``index_kind`` and the pipeline's timings.
    """
    import shutil
    import tempfile

    from negatron.cluster import storage
    from negatron.cluster.config import ConfigError

    from .embed import embed_corpus
    from .encoder import Encoder
    from .model_io import model_id, resolve_model_path
    from .schema import QRELS, QUERIES, SchemaError, check_table, open_corpus
    from .vector_index import build_index, load_artifact

    qrels_path = storage.join(data, "qrels.parquet")
    queries = check_table(storage.join(data, "queries.parquet"), QUERIES)
    qrels_t = check_table(qrels_path, QRELS)
    corpus_path = storage.join(data, "corpus.parquet")
    judged = {str(d) for d in qrels_t.column("doc_id").to_pylist()}
    mid = model_id(resolve_model_path(model))
    t0 = time.perf_counter()
    tmp = None
    if index is None:
        source = open_corpus(corpus_path)
        found = set()
        for b in range(len(source.blocks)):  # every judged doc must be in the corpus (streamed)
            found.update(d for d in map(str, source.read(b).column("doc_id").to_pylist()) if d in judged)
        if len(found) < len(judged):
            missing = sorted(judged - found)
            raise SchemaError(f"{storage.redact(qrels_path)}: column 'doc_id' has {len(missing)} id(s) not in "
                              f"corpus.parquet, e.g. {missing[0]!r}")
        if work is None:
            tmp = tempfile.mkdtemp(prefix="negatron-eval-")
        wdir = work or tmp
        embed_corpus(model, corpus_path, storage.join(wdir, "embeddings"), actors=actors, cpus_per_actor=cpus_per_actor,
                     gpus_per_actor=gpus_per_actor, batch_size=batch_size, max_length=max_length or 0,
                     log=log, address=address)
        index = storage.join(wdir, f"index_{kind}")
        build_index(storage.join(wdir, "embeddings"), kind, index, corpus=corpus_path,
                    eval_queries=0 if kind == "flat" else 1000, log=log)
    t1 = time.perf_counter()
    try:
        art = load_artifact(index)
        built_with = art.meta.get("model", {}).get("id")
        if built_with != mid:
            raise ConfigError(f"eval: the index {storage.redact(index)} was built with model {built_with}, "
                              f"not {storage.redact(model)} ({mid}); build it with this model")
        qrels = {}
        for q, d, sc in zip(*(qrels_t.column(c).to_pylist() for c in ("query_id", "doc_id", "score"))):
            if sc > 0:
                qrels.setdefault(str(q), {})[str(d)] = float(sc)
        qids = [str(q) for q in queries.column("query_id").to_pylist()]
        keep = [i for i, q in enumerate(qids) if q in qrels]
        unknown = set(qrels) - set(qids)
        if unknown:
            raise SchemaError(f"{storage.redact(qrels_path)}: column 'query_id' has {len(unknown)} id(s) not in "
                              f"queries.parquet, e.g. {sorted(unknown)[0]!r}")
        encoder = Encoder.from_pretrained(model, max_length=max_length)
        q_emb = encoder.encode(queries.column("text").take(keep).to_pylist(), batch_size=batch_size, progress="queries",
                               role="query")
        t2 = time.perf_counter()
        _, rows = art.search(q_emb, top_k)
        doc_ids = art.docs.column("doc_id")
        run = {qids[i]: [str(doc_ids[int(j)].as_py()) for j in row if j >= 0] for i, row in zip(keep, rows)}
        metrics = evaluate_run(run, {qids[i]: qrels[qids[i]] for i in keep})
        metrics.update({"num_docs": art.count, "index_kind": art.meta["kind"], "pipeline_s": round(t1 - t0, 3),
                        "encode_queries_s": round(t2 - t1, 3), "search_s": round(time.perf_counter() - t2, 4)})
        if art.meta.get("recall_at_10") is not None:
            metrics["index_recall_at_10"] = art.meta["recall_at_10"]
        return metrics
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


WEIGHT_GRID = tuple(round(0.1 * i, 1) for i in range(11))  # fusion weights tried on dev


def fuse_scores(first: np.ndarray, second: np.ndarray, weight: float) -> np.ndarray:
    """One query's candidates: ``weight`` · z(second) + (1 − weight) · z(first).

    z standardises a score list over the query's candidates (mean 0, std 1; constant lists give 0),
    so bi-encoder cosines and cross-encoder logits mix on one scale. weight 1 = rerank by the
    second stage alone; 0 = keep the first-stage order.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"rerank weight must be in [0, 1], got {weight}")

    def z(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        sd = x.std()
        return (x - x.mean()) / sd if sd > 0 else np.zeros_like(x)

    if weight == 1.0:
        return np.asarray(second, dtype=np.float64)
    return weight * z(second) + (1.0 - weight) * z(first)


class RerankEval:
    """Second-stage evaluation: a first-stage bi-encoder's top ``depth`` per query, computed once,
    reranked by any cross-encoder passed to :meth:`evaluate` (dev checks during reranker training).
    """

    def __init__(self, first_stage, data: EvalData | str, depth: int = 50, batch_size: int = 64,
                 max_queries: int = 0, max_docs: int = 0, query_max_length: int | None = None,
                 progress: bool = False):
        if isinstance(data, str):
            data = check_eval_dir(data)
        self.qids, self.qtexts, self.doc_ids, self.docs, self.qrels = _subset(data, max_queries, max_docs)
        scores, idx, self.timing = _retrieve(first_stage, self.qtexts, self.docs, batch_size, max(depth, 100),
                                             query_max_length, progress)
        self.first_run = {q: [self.doc_ids[j] for j in row if j >= 0] for q, row in zip(self.qids, idx)}
        self.candidates = [[int(j) for j in row[:depth] if j >= 0] for row in idx]
        self.first_scores = [np.asarray(s[:len(c)], dtype=np.float64) for s, c in zip(scores, self.candidates)]
        self.depth = depth

    def first_stage_metrics(self) -> dict[str, float]:
        return {**evaluate_run(self.first_run, self.qrels), "num_docs": len(self.docs), **self.timing}

    def rerank_scores(self, reranker, chunk_size: int = 32) -> list[np.ndarray]:
        """The reranker's raw logits for every query's candidates (one array per query)."""
        pairs_q = [self.qtexts[i] for i, c in enumerate(self.candidates) for _ in c]
        pairs_d = [self.docs[j] for c in self.candidates for j in c]
        flat = reranker.score(pairs_q, pairs_d, chunk_size=chunk_size, raw=True) if pairs_q else np.zeros(0)
        out, start = [], 0
        for cand in self.candidates:
            out.append(np.asarray(flat[start:start + len(cand)], dtype=np.float64))
            start += len(cand)
        return out

    def metrics_for(self, scores: list[np.ndarray], weight: float = 1.0) -> dict[str, float]:
        """Metrics after reordering each query's top ``depth`` by the fused scores; the rest keep
        their first-stage order below them (so Recall@100 compares like for like)."""
        run = {}
        for q, cand, first, second in zip(self.qids, self.candidates, self.first_scores, scores):
            s = fuse_scores(first, second, weight)
            top = [self.doc_ids[cand[i]] for i in np.argsort(-s, kind="stable")]
            run[q] = top + [d for d in self.first_run[q] if d not in set(top)]
        m = evaluate_run(run, self.qrels)
        m.update({"num_docs": len(self.docs), "rerank_depth": self.depth, "rerank_weight": weight})
        return m

    def evaluate(self, reranker, chunk_size: int = 32, weight: float = 1.0) -> dict[str, float]:
        """Metrics of the reranked top ``depth`` (fused with the first stage unless weight is 1)."""
        t0 = time.perf_counter()
        scores = self.rerank_scores(reranker, chunk_size)
        m = self.metrics_for(scores, weight)
        m["rerank_s"] = round(time.perf_counter() - t0, 3)
        return m

    def choose_weight(self, reranker, grid: Sequence[float] = WEIGHT_GRID,
                      key: str = "mrr@10") -> tuple[float, dict[float, float]]:
        """The fusion weight with the best ``key`` on this data (ties go to the larger weight),
        and the whole curve. Use dev data; report test with the chosen weight."""
        scores = self.rerank_scores(reranker)
        curve = {float(w): self.metrics_for(scores, float(w))[key] for w in grid}
        best = max(curve, key=lambda w: (round(curve[w], 12), w))
        return best, curve


def evaluate_two_stage(encoder, reranker, data: EvalData | str, depth: int = 50, batch_size: int = 64,
                       query_max_length: int | None = None, progress: bool = True,
                       weights: Sequence[float] = (1.0,)) -> dict[str, dict]:
    """Bi-encoder retrieval, then cross-encoder reranking of the top ``depth``: both metric sets.

    ``reranked`` uses the first of ``weights``; every further weight adds ``reranked@w=<w>``
    (the reranker's scores are computed once).
    """
    ev = RerankEval(encoder, data, depth=depth, batch_size=batch_size, query_max_length=query_max_length,
                    progress=progress)
    t0 = time.perf_counter()
    scores = ev.rerank_scores(reranker)
    rerank_s = round(time.perf_counter() - t0, 3)
    out = {"retrieval": ev.first_stage_metrics()}
    for i, w in enumerate(weights):
        out["reranked" if i == 0 else f"reranked@w={w:g}"] = {**ev.metrics_for(scores, float(w)), "rerank_s": rerank_s}
    return out


def format_table(rows: dict[str, dict[str, float]], keys: Sequence[str] = METRIC_KEYS) -> str:
    """A small text table: one row per named metrics dict."""
    name_w = max(8, *(len(n) for n in rows))
    head = f"{'model':<{name_w}}  " + "  ".join(f"{k:>10}" for k in keys)
    lines = [head, "-" * len(head)]
    for name, m in rows.items():
        lines.append(f"{name:<{name_w}}  " + "  ".join(f"{m.get(k, float('nan')):>10.4f}" for k in keys))
    return "\n".join(lines)


# -- images: frozen-feature accuracy -------------------------------------------------------------

@dataclass
class ImageEval:
    """Frozen-embedding evaluation on a folder with train.parquet / test.parquet (id, image, label)."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray

    @classmethod
    def load(cls, folder: str | Path) -> "ImageEval":
        from .schema import check_images

        from negatron.cluster.storage import join

        parts = []
        for name in ("train", "test"):
            t = check_images(join(folder, f"{name}.parquet"), labels=True)
            parts += [decode_images(t.column("image").to_pylist()), np.asarray(t.column("label").to_pylist())]
        return cls(*parts)

    def evaluate(self, encoder: ImageEncoder, k: int = 20, shots: int = 5, draws: int = 5) -> dict:
        """On frozen features of the eval train/test split:

        - ``knn_acc``: cosine k-NN on the embeddings (similarity-weighted votes);
        - ``probe_acc``: a linear probe (logistic regression, standardised pooled features)
          trained on every labelled train image;
        - ``fewshot_probe_acc``: the same probe from ``shots`` labelled images per class, the
          mean over ``draws`` seeded draws (0 shots = skip). On small, easy data the full probe
          saturates even on random features; the few-shot probe shows what pretraining adds.
        """
        out = {}
        tr, te = encoder.encode(self.train_x), encoder.encode(self.test_x)
        out["knn_acc"] = knn_accuracy(tr, self.train_y, te, self.test_y, k)
        ftr, fte = encoder.encode(self.train_x, features=True), encoder.encode(self.test_x, features=True)
        out["probe_acc"] = probe_accuracy(ftr, self.train_y, fte, self.test_y)
        if shots:
            accs = []
            for draw in range(draws):
                rng = np.random.default_rng(draw)
                idx = np.concatenate([rng.choice(np.flatnonzero(self.train_y == c), min(shots, int((self.train_y == c).sum())),
                                                 replace=False) for c in np.unique(self.train_y)])
                accs.append(probe_accuracy(ftr[idx], self.train_y[idx], fte, self.test_y))
            out["fewshot_probe_acc"] = float(np.mean(accs))
        return out


def probe_accuracy(train: np.ndarray, train_y: np.ndarray, test: np.ndarray, test_y: np.ndarray) -> float:
    """Logistic regression on standardised features; accuracy on ``test``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train)
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(scaler.transform(train), train_y)
    return float((clf.predict(scaler.transform(test)) == test_y).mean())


def knn_accuracy(train: np.ndarray, train_y: np.ndarray, test: np.ndarray, test_y: np.ndarray, k: int = 20) -> float:
    """Cosine k-NN with similarity-weighted votes (exp(s/0.07), as in InstDisc/DINO)."""
    a = train / np.maximum(np.linalg.norm(train, axis=1, keepdims=True), 1e-12)
    b = test / np.maximum(np.linalg.norm(test, axis=1, keepdims=True), 1e-12)
    sims = b @ a.T  # T×N
    k = min(k, len(a))
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    classes = np.unique(train_y)
    votes = np.zeros((len(b), len(classes)))
    w = np.exp(np.take_along_axis(sims, top, axis=1) / 0.07)
    cls_idx = np.searchsorted(classes, train_y[top])
    for j in range(k):
        np.add.at(votes, (np.arange(len(b)), cls_idx[:, j]), w[:, j])
    return float((classes[votes.argmax(1)] == test_y).mean())
