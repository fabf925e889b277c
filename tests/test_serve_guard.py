"""The ingress Guard middleware without Ray: refused requests never reach the app."""

import asyncio
import json

import pytest

from negatron.serve.api import Guard


class Recorder:
    """An inner ASGI app that reads the whole body and records that it ran."""

    def __init__(self):
        self.calls = 0

    async def __call__(self, scope, receive, send):
        self.calls += 1
        while True:
            msg = await receive()
            if not msg.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def call(path="/v1/embeddings", headers=(), chunks=(b"{}",), key=None, limit=1000):
    inner = Recorder()
    guard = Guard(inner)
    Guard.api_key, Guard.max_body_bytes = key, limit
    parts = list(chunks)

    async def receive():
        body = parts.pop(0) if parts else b""
        return {"type": "http.request", "body": body, "more_body": bool(parts)}

    sent = []

    async def send(msg):
        sent.append(msg)

    scope = {"type": "http", "path": path, "method": "POST",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers]}
    asyncio.run(guard(scope, receive, send))
    status = sent[0]["status"]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return status, (json.loads(body) if status != 200 else body), inner.calls


@pytest.fixture(autouse=True)
def _reset():
    yield
    Guard.api_key, Guard.max_body_bytes, Guard.ready, Guard.deadline_s = None, 8_000_000, None, None
    Guard.stopping = False


def test_key_required_everywhere_but_healthz():
    status, body, calls = call(key=b"k")
    assert status == 401 and body["error"]["code"] == "invalid_api_key" and calls == 0
    assert call(headers=[("Authorization", "Bearer nope")], key=b"k")[0] == 401
    assert call(headers=[("Authorization", "Basic k")], key=b"k")[0] == 401
    assert call(headers=[("Authorization", "Bearer k")], key=b"k")[0] == 200
    assert call(path="/healthz", key=b"k")[0] == 200
    assert call(path="/openapi.json", key=b"k")[0] == 401
    # only the exact health paths are open, not any path that ends like one
    assert call(path="/readyz", key=b"k")[0] == 200
    assert call(path="/prefix/healthz/", key=b"k")[0] == 401
    assert call(path="/v1/embeddings/healthz", key=b"k")[0] == 401
    assert call(path="/healthzx", key=b"k")[0] == 401


def test_route_prefix_is_honoured_for_the_open_paths():
    inner = Recorder()
    Guard.api_key = b"k"
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(msg):
        sent.append(msg)

    scope = {"type": "http", "path": "/api/healthz", "root_path": "/api", "method": "GET", "headers": []}
    asyncio.run(Guard(inner)(scope, receive, send))
    assert sent[0]["status"] == 200 and inner.calls == 1


def test_websockets_need_the_key_too():
    inner = Recorder()
    Guard.api_key = b"k"
    sent = []

    async def receive():
        return {"type": "websocket.connect"}

    async def send(msg):
        sent.append(msg)

    scope = {"type": "websocket", "path": "/anything", "headers": []}
    asyncio.run(Guard(inner)(scope, receive, send))
    assert sent == [{"type": "websocket.close", "code": 1008}] and inner.calls == 0


def test_not_ready_answers_503_json_with_retry_after_at_once():
    async def not_ready():
        return 7

    Guard.ready = not_ready
    try:
        status, body, calls = call()
        assert status == 503 and body["error"]["code"] == "not_ready" and calls == 0
        assert call(path="/healthz")[0] == 200  # the health route itself always reaches the app
    finally:
        Guard.ready = None


def test_a_stopping_replica_refuses_new_requests_and_health_checks_at_once():
    Guard.stopping = True
    for path in ("/v1/embeddings", "/healthz", "/readyz"):
        status, body, calls = call(path=path)
        assert status == 503 and body["error"]["code"] == "shutting_down" and calls == 0, path
    assert call(path="/metrics")[0] == 200  # still scraped while it drains


def test_a_request_past_the_deadline_gets_a_json_504():
    class Slow(Recorder):
        async def __call__(self, scope, receive, send):
            await asyncio.sleep(30)

    Guard.deadline_s = 0.2
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(msg):
        sent.append(msg)

    try:
        scope = {"type": "http", "path": "/search", "method": "POST", "headers": [(b"content-length", b"2")]}
        asyncio.run(Guard(Slow())(scope, receive, send))
    finally:
        Guard.deadline_s = None
    assert sent[0]["status"] == 504
    assert json.loads(sent[1]["body"])["error"]["code"] == "timeout"


def test_declared_and_streamed_sizes_are_capped_before_the_app():
    status, body, calls = call(headers=[("Content-Length", "5000")], chunks=[b"x" * 5000])
    assert status == 413 and body["error"]["code"] == "body_too_large" and calls == 0
    status, body, calls = call(chunks=[b"x" * 600, b"x" * 600])  # chunked, no Content-Length
    assert status == 413 and body["error"]["code"] == "body_too_large" and calls == 0
    assert call(chunks=[b"x" * 400, b"x" * 400])[0] == 200  # chunked within the limit: replayed whole
    status, body, _ = call(headers=[("Content-Length", "abc")])
    assert status == 400 and body["error"]["code"] == "invalid_header"
    assert call(headers=[("Content-Length", "2")], chunks=[b"{}"])[0] == 200


@pytest.mark.parametrize("fmt", ["float", "base64"])
def test_embeddings_response_bytes_match_the_schema_and_round_trip_float32(fmt):
    import base64

    import numpy as np

    from negatron.serve.api import EmbeddingsResponse, embeddings_response

    emb = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)  # 3×8
    r = embeddings_response(emb, "tiny", fmt, 11)
    assert r.media_type == "application/json"
    body = EmbeddingsResponse.model_validate_json(r.body)  # the documented response model
    assert body.model == "tiny" and body.usage.prompt_tokens == body.usage.total_tokens == 11
    assert [d.index for d in body.data] == [0, 1, 2] and {d.object for d in body.data} == {"embedding"}
    if fmt == "float":
        got = np.array([d.embedding for d in body.data], dtype=np.float32)
    else:
        got = np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in body.data])
    np.testing.assert_array_equal(got, emb)  # bit-exact after the JSON round trip
    assert json.loads(r.body)["object"] == "list"
