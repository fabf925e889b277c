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
    Guard.api_key, Guard.max_body_bytes = None, 8_000_000


def test_key_required_everywhere_but_healthz():
    status, body, calls = call(key=b"k")
    assert status == 401 and body["error"]["code"] == "invalid_api_key" and calls == 0
    assert call(headers=[("Authorization", "Bearer nope")], key=b"k")[0] == 401
    assert call(headers=[("Authorization", "Basic k")], key=b"k")[0] == 401
    assert call(headers=[("Authorization", "Bearer k")], key=b"k")[0] == 200
    assert call(path="/healthz", key=b"k")[0] == 200
    assert call(path="/openapi.json", key=b"k")[0] == 401
    assert call(path="/prefix/healthz/", key=b"k")[0] == 200


def test_declared_and_streamed_sizes_are_capped_before_the_app():
    status, body, calls = call(headers=[("Content-Length", "5000")], chunks=[b"x" * 5000])
    assert status == 413 and body["error"]["code"] == "body_too_large" and calls == 0
    status, body, calls = call(chunks=[b"x" * 600, b"x" * 600])  # chunked, no Content-Length
    assert status == 413 and body["error"]["code"] == "body_too_large" and calls == 0
    assert call(chunks=[b"x" * 400, b"x" * 400])[0] == 200  # chunked within the limit: replayed whole
    status, body, _ = call(headers=[("Content-Length", "abc")])
    assert status == 400 and body["error"]["code"] == "invalid_header"
    assert call(headers=[("Content-Length", "2")], chunks=[b"{}"])[0] == 200
