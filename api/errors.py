"""Error responses: a human-readable `detail` plus, where useful, a list of precise `errors`."""

from __future__ import annotations

import logging
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status_code: int, detail: str, errors: list[dict[str, Any]] | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.errors = errors
        self.extra = extra


def redact_url(url: str) -> str:
    """A connection URL with any password hidden."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        body: dict[str, Any] = {"detail": exc.detail, **exc.extra}
        if exc.errors is not None:
            body["errors"] = exc.errors
        return JSONResponse(status_code=exc.status_code, content=body)

    @app.exception_handler(redis.ConnectionError)
    @app.exception_handler(redis.TimeoutError)
    async def _redis_down(request: Request, exc: redis.RedisError) -> JSONResponse:
        url = redact_url(request.app.state.settings.redis_url)
        log.warning("job store unreachable: %s", exc)
        return JSONResponse(
            status_code=503,
            content={"detail": f"the broker/job store (Redis at {url}) is unreachable: {exc}; try again shortly"},
        )
