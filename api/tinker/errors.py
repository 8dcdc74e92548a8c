"""How the Tinker-compatible API refuses a request, in the shape the SDK handles.

The SDK retries 408, 409, 429 and every 5xx (for minutes), and takes a 400 with an empty body for a proxy
glitch: bad input is always a 400 (or 404) with a non-empty JSON body `{"detail": "<call>: <field>: <reason>",
"type": ...}`, which it raises at once as `tinker.BadRequestError` / `NotFoundError`.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


class TinkerRefusal(Exception):
    def __init__(self, status: int, detail: str, kind: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.kind = status, detail, kind
        self.headers = headers or {}


def bad_request(call: str, field: str, reason: str) -> TinkerRefusal:
    return TinkerRefusal(400, f"{call}: {field}: {reason}", "invalid_request")


def not_found(call: str, field: str, reason: str) -> TinkerRefusal:
    return TinkerRefusal(404, f"{call}: {field}: {reason}", "not_found")


def unsupported(call: str) -> TinkerRefusal:
    """A call of the SDK this server does not implement: refused at once, never retried."""
    return TinkerRefusal(
        400, f"{call} is not supported by this server", "unsupported", headers={"x-should-retry": "false"}
    )


def busy(call: str, reason: str, retry_after_s: int = 5) -> TinkerRefusal:
    """Room runs out for now: the SDK waits `retry_after_s` and sends the call again."""
    return TinkerRefusal(429, f"{call}: {reason}", "rate_limited", headers={"retry-after": str(retry_after_s)})


def unavailable(call: str, reason: str) -> TinkerRefusal:
    return TinkerRefusal(503, f"{call}: {reason}", "unavailable")


def response(exc: TinkerRefusal) -> JSONResponse:
    body: dict[str, Any] = {"detail": exc.detail, "type": exc.kind}
    return JSONResponse(status_code=exc.status, content=body, headers=exc.headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(TinkerRefusal)
    async def _refusal(_: Request, exc: TinkerRefusal) -> JSONResponse:
        return response(exc)
