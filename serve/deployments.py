"""The model deployments: Encoder (multiplexed bi-encoders), Reranker (cross-encoder), Retriever (faiss).

Each groups concurrent requests with ``@serve.batch``, flattens their texts and runs them in
length-sorted chunks, so one forward pass serves many callers and pads little. Batch limits come
from the config (set on the batch handler at start-up); resources and autoscaling are applied by
the builder in ``app.py``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve

from . import metrics
from .prebuild import artifact_path

logger = logging.getLogger("ray.serve")

# Encoders a replica keeps loaded at once (Serve's multiplexing LRU); fixed when the class is defined.
MAX_MODELS_PER_REPLICA = 4


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(max(1, n))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class LoadAwareWait:
    """Sizes each dynamic batch by the requests in flight.

    Used as ``with wait: await handler(...)`` around a ``@serve.batch`` call. A batch is full when
    it holds every request in flight in this replica (at most ``max_batch``), and waits up to
    ``wait_s`` for them only while others are in flight: a request alone starts at once (no added
    latency at low load), and a few concurrent clients are not kept waiting for a batch size they
    cannot reach. On a few CPU cores the long wait is what lets batches grow: request intake and
    the forward pass share the GIL, so with a short wait the replica runs many tiny batches, each
    paying a forward pass's fixed cost (measured here: mean batch 2.2 at concurrency 32 with a
    5 ms wait, 17 with 50 ms; 88 → 145 texts/s).
    """

    def __init__(self, handler, wait_s: float, max_batch: int):
        self.handler, self.wait_s, self.max_batch, self.in_flight = handler, wait_s, max_batch, 0

    def __enter__(self) -> "LoadAwareWait":
        self.in_flight += 1
        # both are read by Serve's batch queue when a batch starts forming
        self.handler.set_max_batch_size(max(1, min(self.max_batch, self.in_flight)))
        self.handler.set_batch_wait_timeout_s(self.wait_s if self.in_flight > 1 else 0.0)
        return self

    def __exit__(self, *exc) -> None:
        self.in_flight -= 1


class Coalescer:
    """Sends concurrent callers' items downstream together: at most ``slots`` calls in flight.

    ``await coalescer(item)`` returns ``send([items...])[i]`` for its own item. While a slot is free
    an item goes at once (nothing waits at low load); while every slot is busy, items queue and the
    next free slot takes up to ``max_items`` of them in one call. The ingress uses it in front of a
    separate Encoder deployment: one actor hop per batch instead of per request, and up to ``slots``
    calls in flight, so the Encoder's autoscaler still sees the load (slots = its max replicas ×
    target ongoing requests). A failed call fails the callers whose items it carried.
    """

    def __init__(self, send, slots: int, max_items: int):
        if slots < 1 or max_items < 1:
            raise ValueError(f"slots and max_items must be >= 1, got {slots} and {max_items}")
        self.send, self.slots, self.max_items = send, slots, max_items
        self.pending: list[tuple[Any, asyncio.Future]] = []
        self.running: set[asyncio.Task] = set()  # asyncio keeps only weak references to tasks

    async def __call__(self, item):
        fut = asyncio.get_running_loop().create_future()
        self.pending.append((item, fut))
        self._start()
        return await fut

    @property
    def active(self) -> int:
        return len(self.running)

    def _start(self) -> None:
        while len(self.running) < self.slots and self.pending:
            batch, self.pending = self.pending[:self.max_items], self.pending[self.max_items:]
            self.running.add(asyncio.get_running_loop().create_task(self._run(batch)))

    async def _run(self, batch: list[tuple[Any, asyncio.Future]]) -> None:
        try:
            results = await self.send([item for item, _ in batch])
            for (_, fut), res in zip(batch, results):
                if not fut.done():
                    fut.set_result(res)
        except BaseException as e:  # noqa: BLE001 - handed to the callers, who re-raise it
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(e)
        finally:  # before any caller resumes: the next batch starts in this same loop turn
            self.running.discard(asyncio.current_task())
            self._start()


class Readiness:
    """Whether every deployment an app needs can answer, from cheap probe calls.

    ``probes`` maps a deployment name to ``async () -> bool`` (True: it can serve). A probe that
    does not answer within ``timeout_s`` (no replica running yet: the call would queue) or raises
    counts as not ready. Results are cached for ``ttl_s`` and concurrent callers share one round of
    probes. ``gate()`` is what the Guard asks before a model route: None once every deployment has
    answered (it stays open afterwards: later failures are the routes' own 503s), else the seconds
    a client should wait before retrying.
    """

    def __init__(self, probes: dict, timeout_s: float = 2.0, ttl_s: float = 1.0, retry_after_s: int = 5,
                 opened: bool = False, on_open=None):
        self.probes, self.timeout_s, self.ttl_s, self.retry_after_s = dict(probes), timeout_s, ttl_s, retry_after_s
        self.status: dict[str, str] = {n: "starting" for n in self.probes}
        # opened: the app has been ready before (an ingress replica started by an upgrade or a
        # scale-up): requests queue for replacement replicas, as Serve does, instead of a 503
        self.opened = opened or not self.probes
        self.on_open = on_open
        self._checked_at = float("-inf")
        self._round: asyncio.Task | None = None

    @property
    def ready(self) -> bool:
        return all(v == "ready" for v in self.status.values())

    async def _probe(self, name: str, probe) -> tuple[str, str]:
        try:
            ok = await asyncio.wait_for(probe(), self.timeout_s)
            return name, "ready" if ok else "starting"
        except asyncio.TimeoutError:
            return name, "starting"
        except Exception as e:  # noqa: BLE001 - reported, not raised: a probe never fails a request
            # wait_for cancels the queued call at the timeout, and a Serve call can finish that
            # cancellation with Ray's own error, which wait_for then raises instead of TimeoutError
            if isinstance(e, _cancelled_errors()):
                return name, "starting"
            return name, f"error: {type(e).__name__}"

    async def _run_round(self) -> None:
        results = await asyncio.gather(*(self._probe(n, p) for n, p in self.probes.items()))
        self.status = dict(results)
        self._checked_at = asyncio.get_running_loop().time()
        if self.ready and not self.opened:
            self.opened = True
            if self.on_open is not None:
                try:
                    await asyncio.to_thread(self.on_open)
                except Exception as e:  # noqa: BLE001 - remembering is best effort
                    logger.warning("readiness: could not record that the app is ready: %s", e)

    async def check(self) -> dict[str, str]:
        """Probe (or reuse a result younger than ``ttl_s``); returns name -> ready|starting|error."""
        loop = asyncio.get_running_loop()
        if loop.time() - self._checked_at >= self.ttl_s:
            if self._round is None or self._round.done():
                self._round = loop.create_task(self._run_round())
            await asyncio.shield(self._round)
        return dict(self.status)

    async def gate(self) -> int | None:
        if self.opened:
            return None
        await self.check()
        return None if self.opened else self.retry_after_s


def _cancelled_errors() -> tuple[type[BaseException], ...]:
    from ray.exceptions import TaskCancelledError
    from ray.serve.exceptions import RequestCancelledError

    return TaskCancelledError, RequestCancelledError


READY_KV_NAMESPACE = "negatron"


def ready_key(app_name: str) -> str:
    """Ray internal-KV key set once an app's ingress has seen every deployment ready; an ingress
    replica that starts later (upgrade, scale-up, replacement) opens its gate at once.
    ``negatron serve`` clears it before each fresh deploy."""
    return f"serve-ready/{app_name}"


def was_ready(app_name: str) -> bool:
    from ray.experimental.internal_kv import _internal_kv_get

    return bool(_internal_kv_get(ready_key(app_name), namespace=READY_KV_NAMESPACE))


def mark_ready(app_name: str, ready: bool = True) -> None:
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    if ready:
        _internal_kv_put(ready_key(app_name), b"1", namespace=READY_KV_NAMESPACE)
    else:
        _internal_kv_del(ready_key(app_name), namespace=READY_KV_NAMESPACE)


def split_rows(rows, sizes: list[int]) -> list:
    """Cut ``rows`` (N×…) into consecutive pieces of ``sizes`` (summing to N), one per request."""
    out, start = [], 0
    for n in sizes:
        out.append(rows[start:start + n])
        start += n
    return out


async def per_model(items: list[tuple[str, list]], embed) -> list:
    """Run ``await embed(model, flat_inputs)`` once per model named in ``items`` ((model, inputs)
    pairs; the models concurrently) and give each item its own rows, in item order."""
    by_model: dict[str, list[int]] = {}
    for i, (name, _) in enumerate(items):
        by_model.setdefault(name, []).append(i)
    results = await asyncio.gather(*(embed(name, [x for i in idx for x in items[i][1]])
                                     for name, idx in by_model.items()))
    out: list = [None] * len(items)
    for idx, rows in zip(by_model.values(), results):
        for i, piece in zip(idx, split_rows(rows, [len(items[i][1]) for i in idx])):
            out[i] = piece
    return out


def encode_counted(enc, name: str, inputs: list, chunk: int, max_length: int) -> np.ndarray:
    """``enc.encode`` of one batch, counted in the replica's metrics (texts, tokens, padding)."""
    if not hasattr(enc, "tokenizer"):  # an image encoder: no tokens to count
        return enc.encode(inputs, batch_size=chunk, max_length=max_length)
    stats = {"texts": len(inputs)}
    out = enc.encode(inputs, batch_size=chunk, max_length=max_length, stats=stats)
    metrics.observe_encode(name, stats)
    return out


def load_backend(path: str, backend: dict, threads: int):
    """A served encoder on serve.encoder.backend: torch (text or image) or ONNX Runtime (text)."""
    from negatron.trainers.encoder import load_encoder

    if backend.get("backend") == "onnx":
        from negatron.trainers import onnx_backend
        from negatron.trainers.model_io import resolve_model_path

        return onnx_backend.load(resolve_model_path(path), backend.get("quantize", "none"), threads)
    return load_encoder(path)


def replica_labels(deployment: str) -> dict[str, str]:
    try:
        rid = serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a replica (tests)
        rid = str(os.getpid())
    return {"deployment": deployment, "replica": rid}


def _configure_batching(handler, batch: dict) -> None:
    handler.set_max_batch_size(int(batch["max_batch_size"]))
    handler.set_batch_wait_timeout_s(float(batch["batch_wait_timeout_s"]))


@serve.deployment(name="Encoder")
class EncoderDeployment:
    """Bi-encoders by name. ``embed(model, texts)`` -> float32 N×D (unit rows when the model normalises).

    Args:
        models: name -> folder (resolved paths); requests pick one by the multiplexed model id.
        max_length: token limit (0 = each model's own).
        batch: BatchConfig as a dict.
        torch_threads: intra-op threads of this replica.
    """

    def __init__(self, models: dict[str, str], max_length: int, batch: dict, torch_threads: int = 1,
                 backend: dict | None = None):
        from negatron.trainers.model_io import resolve_model_path

        set_threads(torch_threads)
        self.backend = backend or {"backend": "torch", "quantize": "none"}
        self.threads = torch_threads
        # a folder on an object store is fetched once per node into the local cache
        self.paths = {name: str(resolve_model_path(path)) for name, path in models.items()}
        self.max_length = max_length
        self.chunk = int(batch["chunk_size"])
        _configure_batching(self._embed_batch, batch)
        self._batch_wait = LoadAwareWait(self._embed_batch, float(batch["batch_wait_timeout_s"]),
                                         int(batch["max_batch_size"]))

    @serve.multiplexed(max_num_models_per_replica=MAX_MODELS_PER_REPLICA)
    async def get_model(self, name: str):
        if name not in self.paths:
            raise KeyError(f"unknown model {name!r}")
        enc = await asyncio.to_thread(load_backend, self.paths[name], self.backend, self.threads)
        enc.eval()
        logger.info("Encoder: loaded %s from %s", name, self.paths[name])
        return enc

    def _max_len(self, enc) -> int:
        return self.max_length or getattr(enc, "max_length", 0)

    async def embed(self, texts: list) -> np.ndarray:
        """Texts, or (for an image model) decoded images as uint8 arrays."""
        with self._batch_wait:
            return await self._embed_batch(texts)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _embed_batch(self, requests: list[list[str]]) -> list[np.ndarray]:
        # Serve splits batches by multiplexed model id, so one batch = one model.
        name = serve.get_multiplexed_model_id()
        enc = await self.get_model(name)
        flat = [t for texts in requests for t in texts]
        emb = await asyncio.to_thread(encode_counted, enc, name, flat, self.chunk, self._max_len(enc))  # N×D
        return split_rows(emb, [len(texts) for texts in requests])

    async def ready(self) -> bool:
        return True

    async def metrics_text(self) -> tuple[dict, str]:
        return replica_labels("Encoder"), metrics.local_text()

    def check_health(self) -> None:
        for name, path in self.paths.items():
            if not Path(path).is_dir():
                raise RuntimeError(f"model folder of {name!r} disappeared: {path}")


@serve.deployment(name="Reranker")
class RerankerDeployment:
    """Cross-encoder scoring. ``score(query, texts)`` -> float32 logits, input order (the ingress
    turns them into probabilities for /rerank and fuses the logits themselves for /search)."""

    def __init__(self, path: str, max_length: int, batch: dict, torch_threads: int = 1, backend: str = "torch"):
        from negatron.trainers.cross_encoder import CrossEncoder
        from negatron.trainers.model_io import in_run_folder, local_model_folder

        set_threads(torch_threads)
        self.path = str(local_model_folder(path))  # fetched once per node when on an object store
        if backend == "onnx":
            from negatron.trainers import onnx_backend

            folder = in_run_folder(Path(self.path), "config.json")
            self.model = onnx_backend.load(folder, threads=torch_threads, max_length=max_length or None)
        else:
            self.model = CrossEncoder.from_pretrained(self.path, max_length=max_length or None)
        self.model.eval()
        self.chunk = int(batch["chunk_size"])
        _configure_batching(self._score_batch, batch)

    async def score(self, query: str, texts: list[str]) -> np.ndarray:
        return await self._score_batch((query, texts))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _score_batch(self, requests: list[tuple[str, list[str]]]) -> list[np.ndarray]:
        queries = [q for q, texts in requests for _ in texts]
        texts = [t for _, ts in requests for t in ts]
        scores = await asyncio.to_thread(self.model.score, queries, texts, self.chunk, raw=True)  # logits
        metrics.observe_rerank(len(texts))
        return split_rows(scores, [len(ts) for _, ts in requests])

    async def ready(self) -> bool:
        return True

    async def metrics_text(self) -> tuple[dict, str]:
        return replica_labels("Reranker"), metrics.local_text()

    def check_health(self) -> None:
        if not Path(self.path).is_dir():
            raise RuntimeError(f"reranker folder disappeared: {self.path}")


@serve.deployment(name="Retriever")
class RetrieverDeployment:
    """A faiss index with its own copy of the encoder that built it.

    The index is a prebuilt artifact (``index_path``, from ``negatron index build``: loaded, its
    texts memory-mapped), the artifact `negatron serve` built for the current model with the
    pipeline (``artifacts``, serve.prebuild: found by model, corpus and settings), or built here
    from ``corpus`` (cached on disk by encoder, corpus and settings).
    Queries are embedded by that same encoder, so a swap (``reconfigure`` with a new ``model``,
    ``corpus`` or ``index_path``) replaces encoder and index together: the new state is made beside
    the old one, which keeps answering until the swap. With ``watch_s`` > 0 the model folder is
    hashed that often, and a checkpoint retrained into the same folder is swapped in the same way.

    user_config keys: ``model`` (folder), ``index_path``, ``artifacts`` or ``corpus`` (Parquet) with ``index``,
    ``cache_dir`` and index parameters (``hnsw_m``, ``hnsw_ef_search``, ``ivf_nlist``,
    ``ivf_nprobe``); ``max_length``, ``watch_s``.
    """

    def __init__(self, batch: dict, torch_threads: int = 1):
        set_threads(torch_threads)
        self.chunk = int(batch["chunk_size"])
        _configure_batching(self._search_batch, batch)
        self.state: dict[str, Any] | None = None
        self.settings: dict[str, Any] = {}
        self._watch: asyncio.Task | None = None
        self._skipped: str | None = None
        self._swaps = metrics.index_gauges(self._index_size)

    def _index_size(self) -> float:
        state = self.state
        if state is None:
            return 0.0
        idx = state["index"]
        return float(getattr(idx, "count", None) or len(getattr(idx, "doc_ids", [])))

    async def reconfigure(self, user_config: dict) -> None:
        """Build the new encoder + index in a worker thread: the replica's event loop stays free,
        so searches (on the old state) and readiness probes are answered during a swap."""
        if user_config == self.settings and self.state is not None:
            return
        cfg = dict(user_config)
        state = await asyncio.to_thread(self._build, cfg)
        if self.state is not None:
            self._swaps.inc()
        # one assignment: requests in flight keep the state they started with
        self.state = state
        self.settings = cfg
        if float(cfg.get("watch_s") or 0) > 0 and self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._watch_model())

    def _build(self, cfg: dict, folder_id: str | None = None) -> dict[str, Any]:
        from negatron.trainers.encoder import Encoder
        from negatron.trainers.model_io import model_id

        folder = enc_folder(cfg["model"])
        mid = folder_id or model_id(folder)
        enc = Encoder.from_pretrained(folder)
        index_path = _artifact_for(cfg, mid)
        if index_path:
            from negatron.trainers.vector_index import load_artifact

            idx = load_artifact(index_path)
            if idx.meta["model"]["id"] != mid:
                raise RuntimeError(f"the index artifact {index_path} was built with model {idx.meta['model']['id']}, "
                                   f"the model folder now holds {mid}")
            max_len = int(cfg.get("max_length") or 0) or int(idx.meta.get("max_length") or 0) or enc.max_length
        else:
            from .index import load_or_build

            max_len = int(cfg.get("max_length") or 0) or enc.max_length
            index_args = {k: cfg[k] for k in ("hnsw_m", "hnsw_ef_search", "ivf_nlist", "ivf_nprobe") if k in cfg}
            idx = load_or_build(cfg["corpus"], folder, lambda texts: enc.encode(texts, self.chunk, max_len, role="document"),
                                kind=cfg.get("index", "flat"), cache_dir=cfg.get("cache_dir") or None,
                                log=logger.info, embed_settings={"max_length": max_len}, **index_args)
        enc.eval()
        return {"encoder": enc, "index": idx, "max_length": max_len, "model": cfg["model"], "model_id": mid,
                "source": index_path or cfg.get("corpus")}

    async def info(self) -> dict[str, Any]:
        """What this replica serves: the model's content id, the index's source (an artifact folder,
        or the corpus embedded here) and its size."""
        state = self.state
        if state is None:
            return {}
        return {"model_id": state["model_id"], "source": state["source"],
                "artifact": bool(state["source"]) and state["source"] != self.settings.get("corpus"),
                "count": int(self._index_size())}

    async def metrics_text(self) -> tuple[dict, str]:
        return replica_labels("Retriever"), metrics.local_text()

    async def _watch_model(self) -> None:
        """Swap in a checkpoint retrained into the served model folder (found by its content hash)."""
        from negatron.trainers.model_io import model_id

        while True:
            await asyncio.sleep(float(self.settings.get("watch_s") or 0) or 30.0)
            state, cfg = self.state, dict(self.settings)
            try:
                now = await asyncio.to_thread(lambda: model_id(enc_folder(cfg["model"])))
                if state is None or now == state["model_id"]:
                    continue
                target = cfg.get("index_path") or (cfg.get("artifacts") and await asyncio.to_thread(
                    artifact_path, cfg["artifacts"], now))
                if target and await asyncio.to_thread(_artifact_model_id, target) != now:
                    if self._skipped != now:  # the artifact is built by the pipeline, not here
                        logger.warning("Retriever: the model folder changed to %s but %s is not built for it yet; "
                                       "serving the old model and index until it is", now, target)
                        self._skipped = now
                    continue
                logger.info("Retriever: the model folder changed (%s -> %s); building the new index", state["model_id"], now)
                new = await asyncio.to_thread(self._build, cfg, now)
                if self.settings == cfg:  # no reconfigure came in meanwhile
                    self.state = new
                    self._swaps.inc()
                    logger.info("Retriever: swapped to model %s", now)
            except Exception as e:  # noqa: BLE001 - the old index keeps answering
                logger.warning("Retriever: keeping the current index: %s", e)

    async def search(self, query: str, k: int) -> list[tuple[str, float, str]]:
        return await self._search_batch((query, k))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _search_batch(self, requests: list[tuple[str, int]]) -> list[list[tuple[str, float, str]]]:
        state = self.state
        k = max(k for _, k in requests)

        metrics.observe_search(len(requests))

        def run():
            emb = state["encoder"].encode([q for q, _ in requests], self.chunk, state["max_length"], role="query")  # Q×D
            scores, rows = state["index"].search(emb, k)  # Q×k
            idx = state["index"]
            return [[(*idx.doc(int(r)), float(s)) for s, r in zip(srow[:want], rrow[:want]) if r >= 0]
                    for (_, want), srow, rrow in zip(requests, scores, rows)]

        hits = await asyncio.to_thread(run)
        return [[(doc_id, score, text) for doc_id, text, score in row] for row in hits]

    async def ready(self) -> bool:
        return self.state is not None

    def check_health(self) -> None:
        if self.state is None:
            raise RuntimeError("no index loaded")


def _artifact_model_id(path: str) -> str | None:
    """The model content id an artifact was built with; None while it is not built."""
    from negatron.cluster import storage
    from negatron.trainers.vector_index import META_FILE

    meta = storage.join(path, META_FILE)
    return (storage.read_json(meta).get("model") or {}).get("id") if storage.is_file(meta) else None


def _artifact_for(cfg: dict, mid: str) -> str | None:
    """The artifact a Retriever loads for the model ``mid``: ``index_path`` as given, or the one the
    pipeline built for ``mid`` (``artifacts``: serve.prebuild); None = embed ``corpus`` here."""
    if cfg.get("index_path"):
        return cfg["index_path"]
    if cfg.get("artifacts"):
        path = artifact_path(cfg["artifacts"], mid)
        if _artifact_model_id(path) == mid:
            return path
        logger.warning("Retriever: no pipeline-built index for model %s yet (%s); embedding the corpus here", mid, path)
    return None


def enc_folder(path: str) -> str:
    from negatron.trainers.model_io import resolve_model_path

    return str(resolve_model_path(path))
