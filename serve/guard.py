"""The ASGI guard in front of every route: API key, readiness gate, body limit, deadline."""

import asyncio
import hmac
import json
from typing import Optional

from .schemas import error_body

OPEN_PATHS = ("/healthz", "/readyz")  # answer without the API key (exact paths, after the route prefix)
UNGATED_PATHS = OPEN_PATHS + ("/metrics", "/docs", "/openapi.json", "/v1/models", "/docs/oauth2-redirect", "/redoc")


class Guard:
    """ASGI middleware that runs before routing and body parsing, so a refused request costs nothing:

    - the API key (``Authorization: Bearer``, constant-time) on every HTTP route and websocket but
      exactly ``/healthz`` and ``/readyz`` (the OpenAPI schema and ``/docs`` included);
    - readiness: until every deployment the app needs has answered once (``ready``), a request to
      a model route gets a JSON 503 with ``Retry-After`` at once instead of waiting in a queue;
    - shutting down (``stopping``): every request but ``/metrics`` gets a JSON 503 at once;
    - the body size limit (``serve.limits.max_body_bytes``), from Content-Length when sent;
      a chunked body is read up to the limit first and then handed on;
    - a deadline (``deadline_s``, a little under ``serve.request_timeout_s``): a request not
      answered by then gets a JSON 504, before Ray Serve's proxy would answer 408 in plain text.

    Settings live on the class: each Ingress replica is its own process and sets them at start.
    """

    api_key: Optional[bytes] = None
    max_body_bytes: int = 8_000_000
    ready = None  # async () -> None when ready, else the seconds a client should wait
    deadline_s: Optional[float] = None
    stopping = False  # set when `negatron serve` stops: new requests are refused while in-flight ones finish

    def __init__(self, inner):
        self.inner = inner

    @staticmethod
    async def _refuse(send, status: int, message: str, code: str, param: Optional[str] = None,
                      extra_headers: tuple = ()) -> None:
        body = json.dumps(error_body(status, message, param, code)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   *extra_headers]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    def _route(scope) -> str:
        """The path after the application's route prefix."""
        path, root = scope.get("path", ""), scope.get("root_path", "") or ""
        return path[len(root):] if root and path.startswith(root) else path

    def _key_ok(self, headers: dict) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.inner(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        route = self._route(scope)
        if scope["type"] == "websocket":  # the API has none; never let one past the key
            if self.api_key is not None and not self._key_ok(headers):
                return await send({"type": "websocket.close", "code": 1008})
            return await self.inner(scope, receive, send)
        if self.api_key is not None and route not in OPEN_PATHS and not self._key_ok(headers):
            return await self._refuse(send, 401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                      "invalid_api_key")
        if self.stopping and route != "/metrics":
            # health checks fail too, so a load balancer stops sending; answered at once, so the
            # replica's drain (which waits for zero requests in flight) ends although clients keep sending
            return await self._refuse(send, 503, "the server is shutting down; retry against another replica "
                                      "or after it restarts", "shutting_down")
        if self.ready is not None and route not in UNGATED_PATHS:
            wait = await type(self).ready()  # a plain callable, not a method
            if wait is not None:
                return await self._refuse(send, 503, "the server is starting: its models or index are not "
                                          f"ready yet; retry in {wait} s (GET /readyz says when)", "not_ready",
                                          extra_headers=((b"retry-after", str(wait).encode()),))
        limit = self.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                return await self._refuse(send, 400, "invalid Content-Length header", "invalid_header")
            if size > limit:
                return await self._refuse(send, 413, f"the request body is {size} bytes; the limit is {limit}",
                                          "body_too_large")
        if declared is not None or scope.get("method") in ("GET", "HEAD"):
            return await self._with_deadline(scope, receive, send)
        # no Content-Length (chunked): read up to the limit first, then replay the body
        chunks, received = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return  # the client went away
            chunks.append(msg.get("body", b""))
            received += len(chunks[-1])
            if received > limit:
                return await self._refuse(send, 413, f"the request body exceeds the limit of {limit} bytes",
                                          "body_too_large")
            if not msg.get("more_body"):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed():
            return replay.pop() if replay else await receive()

        await self._with_deadline(scope, replayed, send)

    async def _with_deadline(self, scope, receive, send):
        if not self.deadline_s:
            return await self.inner(scope, receive, send)
        started = False

        async def tracked(msg):
            nonlocal started
            started = True
            await send(msg)

        try:
            await asyncio.wait_for(self.inner(scope, receive, tracked), self.deadline_s)
        except asyncio.TimeoutError:
            if not started:
                await self._refuse(send, 504, f"the request was not answered within {self.deadline_s:g} s "
                                   "(serve.request_timeout_s); the server is overloaded or a model is stuck",
                                   "timeout")
