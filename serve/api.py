"""HTTP API: the FastAPI app, its error handlers and the Ingress deployment (the routes).

- ``POST /v1/embeddings``: OpenAI-compatible (``input`` string or list, ``model``, ``encoding_format``
  float|base64, ``usage``), so the official ``openai`` client works unchanged.
- ``POST /rerank``: ``{query, texts, top_n?, return_text?}`` -> ``[{index, score, text?}]`` best first.
- ``POST /v1/rerank``, ``POST /v2/rerank``: Cohere's shapes (``{model, query, documents, top_n?,
  return_documents?}`` -> ``{id, results: [{index, relevance_score, document?}], meta}``), so the
  official ``cohere`` client works unchanged.
- ``POST /search``: ``{query, top_k, rerank?}`` -> ``[{doc_id, score, text}]`` best first.
- ``GET /healthz``, ``GET /v1/models``, OpenAPI docs at ``/docs``.

Every rejected request gets a 4xx with ``{"error": {"message", "type", "param", "code"}}`` naming
the field; nothing from inside Ray reaches the client. The schemas are in ``schemas``, the guard
middleware in ``guard``, image decoding in ``image_input``, reranked-search scores in ``scoring``.
"""

import asyncio
import base64
import logging
import os
import uuid
from typing import Any, Optional

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray import serve

from .deployments import (Coalescer, LoadAwareWait, Readiness, encode_counted, load_backend, mark_ready, per_model,
                          replica_labels, was_ready)
from . import metrics
from .guard import Guard
from .image_input import decode_images_request
from .schemas import (ApiError, CohereRerankRequest, EmbeddingsRequest, EmbeddingsResponse, ImageEmbeddingsRequest, IngressSettings,
                      RerankRequest, RerankResult, SearchRequest, SearchResult, error_body)
from .scoring import rerank_order, sigmoid  # noqa: F401 - re-exported

logger = logging.getLogger("ray.serve")


# -- the app --------------------------------------------------------------------------------------

app = FastAPI(title="Negatron", version="0.1.0",
              description="Embeddings (OpenAI-compatible), reranking and retrieval from Negatron checkpoints.")


app.add_middleware(Guard)
# outermost (added last): the guard's refusals are counted too
app.add_middleware(metrics.RequestMetrics,
                   paths=lambda: set(app.openapi()["paths"]) | {getattr(r, "path", "") for r in app.routes})


@app.exception_handler(ApiError)
async def _api_error(_: Request, e: ApiError) -> JSONResponse:
    return JSONResponse(error_body(e.status, e.message, e.param, e.code), status_code=e.status)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
    """Routing and body-reading errors (404, 405, an unreadable body) in the same JSON shape."""
    code = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
    return JSONResponse(error_body(e.status_code, str(e.detail), None, code), status_code=e.status_code,
                        headers=getattr(e, "headers", None))


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param(loc) -> str:
    """('body', 'input', 'list[str]', 1) -> 'input[1]': the field as a client names it."""
    out: list[str] = []
    for p in loc:
        if p == "body" and not out:
            continue
        if isinstance(p, int):
            if out:
                out[-1] += f"[{p}]"
        elif "[" not in p and p not in _TYPE_TAGS:
            out.append(p)
    return ".".join(out)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
    errs = e.errors()
    param = _param(errs[0].get("loc", ())) if errs else ""
    seen, msgs = set(), []
    for er in errs:
        where = _param(er.get("loc", ())) or "body"
        if where not in seen:  # a union reports once per member type: keep the first
            seen.add(where)
            msgs.append(f"{where}: {er.get('msg')}")
    return JSONResponse(error_body(422, "; ".join(msgs[:5]), param or None, "invalid_type"), status_code=422)


def _f32_base64(vec: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(vec, dtype="<f4").tobytes()).decode("ascii")


def embeddings_response(emb, model: str, encoding_format: str, tokens: int) -> Response:
    """An ``EmbeddingsResponse`` as JSON bytes, written by orjson straight from the float32 rows.

    Skips FastAPI's generic response path (validate the model, walk every float in Python, json.dumps);
    float32 values are written in their shortest round-trip form, half the bytes of Python floats.
    """
    if encoding_format == "base64":
        data = [{"object": "embedding", "index": i, "embedding": _f32_base64(v)} for i, v in enumerate(emb)]
    else:
        data = [{"object": "embedding", "index": i, "embedding": np.ascontiguousarray(v, dtype=np.float32)}
                for i, v in enumerate(emb)]
    body = {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


def document_text(doc, i: int, rank_fields: Optional[list[str]]) -> str:
    """A Cohere document -> the text to rank: a string, an object's ``text``, or with
    ``rank_fields`` those fields as ``name: value`` lines."""
    if isinstance(doc, str):
        return doc
    if rank_fields:
        missing = [f for f in rank_fields if f not in doc]
        if missing:
            raise ApiError(400, f"'documents[{i}]' has no field {missing[0]!r} named in 'rank_fields'",
                           f"documents[{i}]", "missing_field")
        return "\n".join(f"{f}: {doc[f]}" for f in rank_fields)
    if not isinstance(doc.get("text"), str):
        raise ApiError(400, f"'documents[{i}]' is an object without a string 'text' field (or give 'rank_fields')",
                       f"documents[{i}]", "missing_field")
    return doc["text"]


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    """Validates requests and routes them to the model deployments.

    Args:
        encoder: handle of the Encoder deployment.
        reranker / retriever: handles, or None when not deployed.
        settings: ``IngressSettings`` (or the same as a dict): served models and their folders,
            limits, token limits, the reranker, batching, the API key's environment variable.
    """

    def __init__(self, encoder, reranker, retriever, settings: IngressSettings | dict[str, Any]):
        from transformers import AutoTokenizer

        st = settings if isinstance(settings, IngressSettings) else IngressSettings.model_validate(settings)
        self.encoder, self.reranker, self.retriever = encoder, reranker, retriever
        self.local: dict[str, Any] = {}
        self._coalesce: Optional[Coalescer] = None
        if st.colocate:  # the encoders run in this replica: no hop per request
            from .deployments import set_threads

            set_threads(st.torch_threads)
            self.local = {n: load_backend(p, st.backend, st.torch_threads).eval() for n, p in st.models.items()}
            self.chunk = st.batch.chunk_size
            self._local_embed.set_max_batch_size(st.batch.max_batch_size)
            self._batch_wait = LoadAwareWait(self._local_embed, st.batch.batch_wait_timeout_s, st.batch.max_batch_size)
        elif st.batch.max_batch_size > 1:
            # separate Encoder: requests that arrive while its calls are busy travel together
            self._coalesce = Coalescer(self._remote_embed, st.encoder_slots, st.batch.max_batch_size)
            coalesce = self._coalesce
            metrics.coalescer_gauges(lambda: len(coalesce.pending), lambda: coalesce.active)
        self.models: dict[str, str] = st.models
        self.default_model: str = st.default_model
        self.limits: dict[str, Any] = st.limits.model_dump()
        self.rerank_depth = st.rerank_depth
        self.rerank_weight = st.rerank_weight
        self.dims: dict[str, int] = st.dims
        self.image_models = set(st.image_models)
        from negatron.trainers.model_io import in_run_folder, local_model_folder, resolve_model_path

        # a model on an object store is fetched once per node into the local cache
        text = {n: resolve_model_path(p) for n, p in self.models.items() if n not in self.image_models}
        self.tokenizers = {n: AutoTokenizer.from_pretrained(p, local_files_only=True) for n, p in text.items()}
        self.token_limits = {n: st.max_length or st.model_max_lengths[n] for n in text}
        self.rr_tokenizer = None
        self.rr_name = st.reranker_name
        if st.reranker_path:
            self.rr_tokenizer = AutoTokenizer.from_pretrained(
                in_run_folder(local_model_folder(st.reranker_path), "config.json"), local_files_only=True)
            self.rr_limit = st.reranker_max_length or 512
        env = st.api_key_env
        key = os.environ.get(env) if env else None
        if env and not key:
            raise RuntimeError(f"serve.api_key_env names {env!r}, but that environment variable is not set")
        Guard.api_key = key.encode() if key else None
        Guard.max_body_bytes = st.limits.max_body_bytes
        self.image_shapes: dict[str, tuple[int, int]] = dict(st.image_shapes)
        self.prompts: dict[str, dict[str, str]] = dict(st.prompts)
        # answer before the proxy's own (plain-text 408) timeout fires
        timeout = st.request_timeout_s
        Guard.deadline_s = max(1.0, timeout - min(5.0, timeout * 0.1)) if timeout else None
        # Readiness from the Serve controller's view: a deployment can answer once it has a
        # replica that finished starting (RUNNING, or UPDATING: reconfiguring a running one, e.g.
        # an index swap). A probe call would time out just the same on a replica that is merely
        # busy or reconfiguring, and close the gate of an ingress replica started mid-upgrade.
        self.app_name = serve.get_replica_context().app_name
        self._status_cache: tuple[float, dict] | None = None
        needed = {"encoder": ("Encoder", self.encoder), "reranker": ("Reranker", self.reranker),
                  "retriever": ("Retriever", self.retriever)}
        probes = {key: self._deployment_probe(name) for key, (name, handle) in needed.items() if handle is not None}
        try:
            opened = was_ready(self.app_name)
        except Exception:  # noqa: BLE001 - no KV: start closed, which is the safe side
            opened = False
        self.readiness = Readiness(probes, opened=opened, on_open=lambda: mark_ready(self.app_name))
        Guard.ready = self.readiness.gate

    # -- helpers --

    async def _replica_states(self) -> dict[str, dict[str, int]]:
        """deployment name -> {replica state: count} of this app (one controller call, cached 0.5 s)."""
        now = asyncio.get_running_loop().time()
        if self._status_cache is not None and now - self._status_cache[0] < 0.5:
            return self._status_cache[1]
        app = await asyncio.to_thread(lambda: serve.status().applications.get(self.app_name))
        states = {n: {str(k).rsplit(".", 1)[-1]: int(v) for k, v in d.replica_states.items()}
                  for n, d in (app.deployments.items() if app is not None else [])}
        self._status_cache = (now, states)
        return states

    def _deployment_probe(self, deployment: str):
        async def probe() -> bool:
            states = (await self._replica_states()).get(deployment, {})
            return states.get("RUNNING", 0) + states.get("UPDATING", 0) > 0
        return probe

    def _check_texts(self, texts: list[str], param: str, tokenizer, limit: int, pair_with: Optional[str] = None,
                     single: bool = False, prompt: str = "") -> int:
        """Validate sizes; returns the token count (after truncation). ``single``: one string, not a
        list; ``prompt``: put in front of each text before counting its tokens."""
        lim = self.limits

        def at(i: int) -> str:
            return param if single else f"{param}[{i}]"

        if not texts:
            raise ApiError(400, f"'{param}' is empty: give at least one text", param, "empty_input")
        if len(texts) > lim["max_texts"]:
            raise ApiError(413, f"'{param}' has {len(texts)} texts; the limit is {lim['max_texts']} per request",
                           param, "too_many_texts")
        for i, t in enumerate(texts):
            if not t or not t.strip():
                raise ApiError(400, f"'{at(i)}' is an empty string", at(i), "empty_input")
            if len(t) > lim["max_text_chars"]:
                raise ApiError(413, f"'{at(i)}' has {len(t)} characters; the limit is {lim['max_text_chars']}",
                               at(i), "text_too_long")
        if pair_with is None:
            counts = [len(ids) for ids in tokenizer([prompt + t for t in texts] if prompt else texts,
                                                    add_special_tokens=True)["input_ids"]]
        else:
            counts = [len(ids) for ids in tokenizer([pair_with] * len(texts), texts)["input_ids"]]
        if lim["overlong"] == "reject":
            for i, n in enumerate(counts):
                if n > limit:
                    raise ApiError(413, f"'{at(i)}' is {n} tokens; the model's limit is {limit} "
                                        "(the server is configured to reject, not truncate)", at(i), "text_too_long")
        return sum(min(n, limit) for n in counts)

    def _model_name(self, name: Optional[str]) -> str:
        if name in (None, "", "default"):
            return self.default_model
        if name not in self.models:
            raise ApiError(404, f"unknown model {name!r}; served models: {', '.join(sorted(self.models))}",
                           "model", "model_not_found")
        return name

    async def _call(self, what: str, coro):
        try:
            return await coro
        except ApiError:
            raise
        except Exception as e:  # a replica died or is overloaded: say so, without Ray's traceback
            logger.warning("%s failed: %s", what, e)
            raise ApiError(503, f"{what} is unavailable right now ({type(e).__name__}); retry shortly",
                           None, "unavailable") from None

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _local_embed(self, items: list[tuple[str, list[str]]]) -> list[np.ndarray]:
        """Colocated mode: concurrent requests' texts in one length-sorted encode per model."""
        return await per_model(items, lambda name, flat: asyncio.to_thread(
            encode_counted, self.local[name], name, flat, self.chunk, self.token_limits.get(name, 0)))

    async def _remote_embed(self, items: list[tuple[str, list]]) -> list[np.ndarray]:
        """Separate Encoder: coalesced requests' inputs go to it in one call per model (one actor
        hop per batch instead of per request); the Encoder batches calls again across ingress
        replicas."""
        return await per_model(items, lambda name, flat: self._call(
            "the encoder", self.encoder.options(multiplexed_model_id=name).embed.remote(flat)))

    def begin_stop(self) -> None:
        """Called by `negatron serve` before it deletes the app: from now on this replica refuses
        new requests (JSON 503, health checks included) and finishes the ones in flight. With direct
        ingress no proxy stops routing to it, so without this a steady stream of clients keeps the
        replica's drain from ever reaching zero requests in flight."""
        Guard.stopping = True

    # -- routes --

    @app.get("/healthz")
    async def healthz(self) -> Response:
        """200 once every deployment this app needs can answer (readiness for load balancers and
        Kubernetes probes), else 503 with ``Retry-After`` and which deployment is not ready."""
        status = await self.readiness.check()
        ready = self.readiness.ready
        body = {"status": "ok" if ready else "starting", "deployments": status, "models": sorted(self.models),
                "default_model": self.default_model, "reranker": self.reranker is not None,
                "search": self.retriever is not None}
        if not ready:
            body["error"] = error_body(503, "not ready: " + ", ".join(f"{n} {v}" for n, v in status.items()
                                                                       if v != "ready"), None, "not_ready")["error"]
        headers = None if ready else {"Retry-After": str(self.readiness.retry_after_s)}
        return JSONResponse(body, status_code=200 if ready else 503, headers=headers)

    @app.get("/readyz")
    async def readyz(self) -> Response:
        """The same check as /healthz (the name Kubernetes users look for)."""
        return await self.healthz()

    @app.get("/metrics")
    async def metrics_route(self) -> Response:
        """Prometheus text format: this ingress replica's counters and one replica of each model
        deployment's (serve.metrics); a deployment that does not answer within 5 s is reported
        as ``negatron_metrics_source_up 0``."""
        deployments = {"Encoder": self.encoder, "Reranker": self.reranker, "Retriever": self.retriever}
        calls = {name: h.metrics_text.remote() for name, h in deployments.items() if h is not None}
        sources = [(replica_labels("Ingress"), metrics.local_text())]
        up = []
        for name, call in calls.items():
            try:
                labels, text = await asyncio.wait_for(call, 5.0)
                sources.append((labels, text))
                up.append(f'negatron_metrics_source_up{{deployment="{name}"}} 1')
            except Exception as e:  # noqa: BLE001 - scraping must not fail because one replica is busy
                logger.warning("metrics: %s did not answer: %s", name, e)
                up.append(f'negatron_metrics_source_up{{deployment="{name}"}} 0')
        up_text = "# HELP negatron_metrics_source_up Whether the deployment's replica answered this scrape.\n" \
                  "# TYPE negatron_metrics_source_up gauge\n" + "".join(line + "\n" for line in up)
        sources.append(({}, up_text))
        text = await asyncio.to_thread(metrics.merge, sources)
        return Response(text, media_type=metrics.CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models(self) -> dict:
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "negatron"}
                                           for n in sorted(self.models)]}

    @app.post("/v1/embeddings", response_model=EmbeddingsResponse)
    async def embeddings(self, body: EmbeddingsRequest) -> Response:
        name = self._model_name(body.model)
        if name in self.image_models:
            raise ApiError(400, f"model {name!r} embeds images: POST base64 images to /v1/images/embeddings",
                           "model", "wrong_modality")
        single = isinstance(body.input, str)
        texts = [body.input] if single else list(body.input)
        role = {"search_query": "query", "search_document": "document"}.get(body.input_type, body.input_type)
        prompt = self.prompts.get(name, {}).get(role, "") if role else ""
        # tokenizing up to max_texts × max_text_chars takes a while: off the event loop
        tokens = await asyncio.to_thread(self._check_texts, texts, "input", self.tokenizers[name],
                                         self.token_limits[name], single=single, prompt=prompt)
        if prompt:
            texts = [prompt + t for t in texts]
        if body.dimensions is not None and self.dims.get(name) and body.dimensions != self.dims[name]:
            raise ApiError(400, f"'dimensions' {body.dimensions} is not supported: {name} returns {self.dims[name]}",
                           "dimensions", "unsupported_dimensions")
        return await self._embed(name, texts, body.encoding_format, tokens)

    @app.post("/v1/images/embeddings", response_model=EmbeddingsResponse)
    async def image_embeddings(self, body: ImageEmbeddingsRequest) -> Response:
        name = self._model_name(body.model)
        if name not in self.image_models:
            raise ApiError(400, f"model {name!r} embeds text: POST texts to /v1/embeddings", "model", "wrong_modality")
        single = isinstance(body.input, str)
        items = [body.input] if single else list(body.input)
        size, channels = self.image_shapes.get(name, (0, 0))
        # decoding is CPU work: off the event loop, so other requests keep flowing
        images = await asyncio.to_thread(decode_images_request, items, single, self.limits, size, channels)
        return await self._embed(name, images, body.encoding_format, 0)

    async def _embed(self, name: str, inputs: list, encoding_format: str, tokens: int) -> Response:
        """Texts or decoded images through the encoder (colocated or the Encoder deployment)."""
        if self.local:
            with self._batch_wait:
                emb = await self._local_embed((name, inputs))
        elif self._coalesce is not None:
            emb = await self._coalesce((name, inputs))
        else:
            emb = await self._call("the encoder", self.encoder.options(multiplexed_model_id=name).embed.remote(inputs))
        return embeddings_response(emb, name, encoding_format, tokens)

    @app.post("/rerank", response_model=list[RerankResult], response_model_exclude_none=True)
    async def rerank(self, body: RerankRequest) -> list[RerankResult]:
        scores, order = await self._rerank(body.query, body.texts, "texts", body.top_n)
        return [RerankResult(index=int(i), score=float(scores[i]), text=body.texts[i] if body.return_text else None)
                for i in order]

    @app.post("/v1/rerank")
    async def cohere_rerank_v1(self, body: CohereRerankRequest) -> Response:
        return await self._cohere_rerank(body, "1")

    @app.post("/v2/rerank")
    async def cohere_rerank_v2(self, body: CohereRerankRequest) -> Response:
        return await self._cohere_rerank(body, "2")

    async def _cohere_rerank(self, body: CohereRerankRequest, version: str) -> Response:
        """Cohere's rerank: the same scores as /rerank (probabilities), in Cohere's shapes."""
        self._require_reranker()
        if body.model not in (None, "", "default", self.rr_name):
            raise ApiError(404, f"unknown model {body.model!r}; the served reranker is {self.rr_name!r} "
                                "(or send 'default')", "model", "model_not_found")
        texts = [document_text(d, i, body.rank_fields) for i, d in enumerate(body.documents)]
        if body.max_tokens_per_doc is not None and body.max_tokens_per_doc < self.rr_limit:
            texts = await asyncio.to_thread(self._truncate_docs, texts, body.max_tokens_per_doc)
        scores, order = await self._rerank(body.query, texts, "documents", body.top_n)
        results = []
        for i in order:
            item: dict[str, Any] = {"index": int(i), "relevance_score": float(scores[i])}
            if body.return_documents:
                d = body.documents[i]
                item["document"] = d if isinstance(d, dict) else {"text": d}
            results.append(item)
        meta = {"api_version": {"version": version}, "billed_units": {"search_units": 1}}
        return Response(orjson.dumps({"id": str(uuid.uuid4()), "results": results, "meta": meta}),
                        media_type="application/json")

    def _truncate_docs(self, texts: list[str], n: int) -> list[str]:
        ids = self.rr_tokenizer(texts, add_special_tokens=False, truncation=True, max_length=n)["input_ids"]
        return [t if len(i) < n else self.rr_tokenizer.decode(i) for t, i in zip(texts, ids)]

    def _require_reranker(self) -> None:
        if self.reranker is None:
            raise ApiError(404, "no reranker is deployed: start the server with --reranker or serve.reranker.path",
                           None, "no_reranker")

    async def _rerank(self, query: str, texts: list[str], param: str, top_n: Optional[int]):
        """(probabilities in input order, the indices of the best ``top_n`` best first)."""
        self._require_reranker()
        self._check_query(query)
        await asyncio.to_thread(self._check_texts, texts, param, self.rr_tokenizer, self.rr_limit, pair_with=query)
        logits = await self._call("the reranker", self.reranker.score.remote(query, texts))
        order = np.argsort(-np.asarray(logits, dtype=np.float64), kind="stable")[: top_n or len(texts)]
        return sigmoid(logits), order  # what sentence-transformers' CrossEncoder.predict gives

    @app.post("/search", response_model=list[SearchResult], response_model_exclude_none=True)
    async def search(self, body: SearchRequest) -> list[SearchResult]:
        if self.retriever is None:
            raise ApiError(404, "search is not enabled: start the server with --index (serve.retriever.index_path) or --corpus (serve.retriever.corpus)",
                           None, "no_index")
        if body.top_k > self.limits["max_top_k"]:
            raise ApiError(400, f"'top_k' {body.top_k} exceeds the limit {self.limits['max_top_k']}", "top_k", "top_k_too_large")
        if body.rerank and self.reranker is None:
            raise ApiError(400, "'rerank' is true but no reranker is deployed", "rerank", "no_reranker")
        self._check_query(body.query)
        depth = max(body.top_k, self.rerank_depth) if body.rerank else body.top_k
        hits = await self._call("the retriever", self.retriever.search.remote(body.query, depth))
        if not body.rerank or not hits:
            return [SearchResult(doc_id=d, score=s, text=t) for d, s, t in hits[: body.top_k]]
        logits = await self._call("the reranker", self.reranker.score.remote(body.query, [t for _, _, t in hits]))
        final, order = rerank_order([s for _, s, _ in hits], logits, self.rerank_weight, body.top_k)
        return [SearchResult(doc_id=hits[i][0], score=float(final[i]), text=hits[i][2], retrieval_score=hits[i][1])
                for i in order]

    def _check_query(self, query: str) -> None:
        if not query or not query.strip():
            raise ApiError(400, "'query' is empty", "query", "empty_input")
        if len(query) > self.limits["max_text_chars"]:
            raise ApiError(413, f"'query' has {len(query)} characters; the limit is {self.limits['max_text_chars']}",
                           "query", "text_too_long")
