"""The bearer token every vLLM server chatlearn starts requires.

vLLM's ``--api-key`` guards only its OpenAI routes (``/v1``, ...). The
development routes a chatlearn server opens (``/collective_rpc``,
``/reset_prefix_cache``, ``/sleep``, ``/pause``, vLLM's weight-transfer routes)
can replace the policy's weights, so this middleware guards every route but
the health checks. vLLM loads it in the server process by import path
(``--middleware chatlearn.models.server_auth.TokenMiddleware``) and builds it
without arguments: the token comes from ``CHATLEARN_SERVER_TOKEN`` in the
server's environment. This module imports nothing heavy: the server imports it
before vLLM's app starts.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
from typing import Any, Awaitable, Callable

SERVER_TOKEN_ENV = "CHATLEARN_SERVER_TOKEN"
# Liveness probes (load balancers, our own start-up wait) carry no token.
OPEN_PATHS = ("/health", "/ping")

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]


def bearer_matches(header_value: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <token>`` (compared in constant time)."""
    if not header_value or not token:
        return False
    scheme, _, given = header_value.partition(" ")
    if scheme.lower() != "bearer":
        return False
    digest = hashlib.sha256
    return secrets.compare_digest(digest(given.strip().encode()).digest(), digest(token.encode()).digest())


class TokenMiddleware:
    """ASGI middleware: 401 for any HTTP or websocket request without the server's token,
    except ``OPEN_PATHS`` and CORS preflights. A server started without a token refuses
    to run (it would be open to anyone who can reach its port)."""

    def __init__(self, app: ASGIApp) -> None:
        token = os.environ.get(SERVER_TOKEN_ENV, "")
        if not token:
            raise RuntimeError(f"{SERVER_TOKEN_ENV} is not set in the server's environment: a chatlearn vLLM "
                               f"server always requires a token (its control routes can replace the weights)")
        self.app = app
        self._token = token

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] not in ("http", "websocket") or scope.get("method") == "OPTIONS":
            await self.app(scope, receive, send)
            return
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if path in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if bearer_matches(headers.get("authorization"), self._token):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"error": f"unauthorized: {path} needs 'Authorization: Bearer <token>' "
                                   f"(the server's {SERVER_TOKEN_ENV})"}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
