"""Bearer-token access control: with LORA_API_KEY set, every endpoint but the probes needs the key.

The Tinker-compatible routes (`/api/v1/...`) also take it the way the `tinker` SDK sends it: `X-API-Key`, as the
key itself or as `tml-<key>` (the SDK refuses keys without that prefix)."""

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


TINKER_PREFIX = "/api/v1/"


def tinker_key_matches(x_api_key: bytes, api_key: str) -> bool:
    """Whether an X-API-Key header carries `api_key` or `tml-<api_key>` (both compared in constant time)."""
    plain = hmac.compare_digest(x_api_key, api_key.encode())
    prefixed = hmac.compare_digest(x_api_key, f"tml-{api_key}".encode())
    return plain or prefixed


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
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"")
        tinker = scope["path"].startswith(TINKER_PREFIX)
        if key_matches(given, self.api_key) or (
            tinker and tinker_key_matches(headers.get(b"x-api-key", b""), self.api_key)
        ):
            await self.app(scope, receive, send)
            return
        how = "TINKER_API_KEY=tml-<LORA_API_KEY>" if tinker else "'Authorization: Bearer <LORA_API_KEY>'"
        body = json.dumps({"detail": f"missing or wrong API key: send {how}"}).encode()
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
