"""Bearer-token access control: with LORA_API_KEY set, every endpoint but the probes needs the key."""

from __future__ import annotations

import hmac
import json
import os

from starlette.types import ASGIApp, Receive, Scope, Send

# Probes must answer orchestrators without secrets; the dashboard page asks for the key itself.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/dashboard", "/"})


def listening_host(argv: list[str]) -> str:
    """The address uvicorn was told to bind (`--host X` / `--host=X`), else its default."""
    for i, arg in enumerate(argv):
        if arg == "--host" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--host="):
            return arg.split("=", 1)[1]
    return os.environ.get("UVICORN_HOST", "127.0.0.1")


def key_matches(authorization: bytes, api_key: str) -> bool:
    """Whether an Authorization header carries `api_key` as a bearer token.

    Constant-time comparison: response timing must not reveal how much of the key matched."""
    return hmac.compare_digest(authorization, f"Bearer {api_key}".encode())


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" or (
            scope["type"] == "http" and (scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS")
        ):
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if key_matches(given, self.api_key):
            await self.app(scope, receive, send)
            return
        body = json.dumps({"detail": "missing or wrong API key: send 'Authorization: Bearer <LORA_API_KEY>'"}).encode()
        if scope["type"] != "http":  # a websocket without the key: refuse the handshake
            await send({"type": "websocket.close", "code": 1008})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b'Bearer realm="lora-server"'),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
