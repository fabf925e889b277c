"""Prometheus metrics for ``GET /metrics``: each replica counts in its own registry, the ingress
merges them.

Every Serve replica (Ingress, Encoder, Reranker, Retriever) records into one process-local
``prometheus_client`` registry (``registry()``), never the global one Ray's own exporters share.
The ingress answers ``/metrics`` with its own registry plus each model deployment's
``metrics_text()`` (one replica per deployment answers a handle call), every sample labelled
with the ``deployment`` and ``replica`` it came from. Families are:

- ingress: ``negatron_http_requests_total{route,method,code}``,
  ``negatron_http_request_duration_seconds{route}`` (histogram), ``negatron_coalescer_queue_depth``
  and ``negatron_coalescer_calls_in_flight``;
- encoders: ``negatron_encoder_batch_texts`` / ``_batch_tokens`` / ``_padding_waste_ratio``
  (histograms per batch), ``negatron_encoder_texts_total`` / ``_tokens_total`` /
  ``_padded_slots_total`` (padding waste over any window = 1 - tokens / slots);
- reranker: ``negatron_reranker_batch_pairs``, ``negatron_reranker_pairs_total``;
- retriever: ``negatron_index_documents``, ``negatron_index_swaps_total``,
  ``negatron_search_batch_queries``.

Ray Serve's own per-deployment metrics (queue lengths, replica counts, handle latencies) stay on
Ray's metrics export port, where a cluster-wide Prometheus scrapes every node
(docs/serving.md#metrics).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Metric, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_TOKEN_BUCKETS = (16, 64, 256, 1024, 4096, 16384, 65536, 262144)
_RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)

_REGISTRY: CollectorRegistry | None = None
_METRICS: dict[str, Any] = {}


def registry() -> CollectorRegistry:
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = CollectorRegistry(auto_describe=True)
    return _REGISTRY


def _get(name: str, make: Callable[[CollectorRegistry], Any]):
    """One metric object per process, created on first use (replicas import this module once)."""
    if name not in _METRICS:
        _METRICS[name] = make(registry())
    return _METRICS[name]


def requests_total() -> Counter:
    return _get("requests", lambda r: Counter("negatron_http_requests", "HTTP requests answered, by route and code.",
                                              ["route", "method", "code"], registry=r))


def request_seconds() -> Histogram:
    return _get("latency", lambda r: Histogram("negatron_http_request_duration_seconds",
                                               "Time from the request's first byte to the response's start.",
                                               ["route"], buckets=_LATENCY_BUCKETS, registry=r))


def observe_encode(model: str, stats: dict) -> None:
    """One encoder batch: texts, real tokens and computed slots (``Encoder.encode(stats=)``)."""
    texts, tokens, slots = stats.get("texts", 0), stats.get("tokens", 0), stats.get("slots", 0)
    m = _get("encoder", lambda r: {
        "texts": Histogram("negatron_encoder_batch_texts", "Texts per encoder batch.", ["model"],
                           buckets=_SIZE_BUCKETS, registry=r),
        "tokens": Histogram("negatron_encoder_batch_tokens", "Real tokens per encoder batch.", ["model"],
                            buckets=_TOKEN_BUCKETS, registry=r),
        "waste": Histogram("negatron_encoder_padding_waste_ratio",
                           "Share of a batch's computed token slots that were padding.", ["model"],
                           buckets=_RATIO_BUCKETS, registry=r),
        "texts_total": Counter("negatron_encoder_texts", "Texts embedded.", ["model"], registry=r),
        "tokens_total": Counter("negatron_encoder_tokens", "Real tokens embedded.", ["model"], registry=r),
        "slots_total": Counter("negatron_encoder_padded_slots",
                               "Token slots computed, padding included.", ["model"], registry=r),
    })
    m["texts"].labels(model).observe(texts)
    m["tokens"].labels(model).observe(tokens)
    m["waste"].labels(model).observe(1.0 - tokens / slots if slots else 0.0)
    m["texts_total"].labels(model).inc(texts)
    m["tokens_total"].labels(model).inc(tokens)
    m["slots_total"].labels(model).inc(slots)


def observe_rerank(pairs: int) -> None:
    m = _get("reranker", lambda r: (
        Histogram("negatron_reranker_batch_pairs", "Query-text pairs per reranker batch.",
                  buckets=_SIZE_BUCKETS, registry=r),
        Counter("negatron_reranker_pairs", "Query-text pairs scored.", registry=r)))
    m[0].observe(pairs)
    m[1].inc(pairs)


def observe_search(queries: int) -> None:
    _get("search", lambda r: Histogram("negatron_search_batch_queries", "Queries per retriever batch.",
                                       buckets=_SIZE_BUCKETS, registry=r)).observe(queries)


def index_gauges(size: Callable[[], float]) -> Counter:
    """The retriever's index size (read at scrape time) and its swap counter."""
    def make(r):
        g = Gauge("negatron_index_documents", "Documents in the index that answers searches.", registry=r)
        return g, Counter("negatron_index_swaps", "Index swaps (a new model or index took over).", registry=r)
    g, swaps = _get("index", make)
    g.set_function(size)
    return swaps


def coalescer_gauges(depth: Callable[[], float], in_flight: Callable[[], float]) -> None:
    def make(r):
        return (Gauge("negatron_coalescer_queue_depth", "Requests waiting for a free call to the Encoder.",
                      registry=r),
                Gauge("negatron_coalescer_calls_in_flight", "Calls to the Encoder in flight.", registry=r))
    q, f = _get("coalescer", make)
    q.set_function(depth)
    f.set_function(in_flight)


def local_text() -> str:
    return generate_latest(registry()).decode()


# -- merging ----------------------------------------------------------------------------------------

def merge(sources: Iterable[tuple[dict[str, str], str]]) -> str:
    """Exposition texts, each with labels to add to all its samples -> one exposition text.

    Families of the same name from several replicas become one family (the text format allows a
    family once)."""
    families: dict[str, Metric] = {}
    for extra, text in sources:
        for fam in text_string_to_metric_families(text):
            if fam.name.endswith("_created"):  # creation times: noise on a scrape page
                continue
            out = families.get(fam.name)
            if out is None:
                out = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            for s in fam.samples:
                out.samples.append(Sample(s.name, {**s.labels, **extra}, s.value, s.timestamp, s.exemplar))

    class _Merged:
        def collect(self):
            return list(families.values())

    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Merged())
    return generate_latest(reg).decode()


class RequestMetrics:
    """ASGI middleware (outermost, so refusals by the guard are counted): requests by route, method
    and code, and their latency. The route is the matched route's path template; a request refused
    before routing counts under its path when that is one of the app's paths (``paths()``, read
    once); anything else counts as ``other`` (bounded cardinality)."""

    def __init__(self, app, paths: Callable[[], set[str]]):
        self.app, self._paths_fn, self._paths = app, paths, None

    def _route(self, scope) -> str:
        matched = scope.get("route")  # set by FastAPI's router on the shared scope
        if getattr(matched, "path", None):
            return matched.path
        if self._paths is None:
            try:
                self._paths = set(self._paths_fn())
            except Exception:  # noqa: BLE001 - never fail a request over a metric label
                self._paths = set()
        from .guard import Guard

        path = Guard._route(scope)  # the path after the application's route prefix
        return path if path in self._paths else "other"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, code = time.perf_counter(), [500]

        async def send_wrapped(message):
            if message["type"] == "http.response.start":
                code[0] = message["status"]
                request_seconds().labels(self._route(scope)).observe(time.perf_counter() - t0)
            await send(message)

        try:
            await self.app(scope, receive, send_wrapped)
        finally:
            requests_total().labels(self._route(scope), scope.get("method", ""), str(code[0])).inc()
