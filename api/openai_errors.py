"""Errors in OpenAI's shape for the /v1 routes: `{"error": {"message", "type", "param", "code"}}`.

`OpenAIRoute` is the route class of the /v1 routers: it turns every error raised while handling a
request (our ApiError from the shared submission code, FastAPI's validation errors, Redis being
down) into that envelope, so the `openai` client raises its matching exception with our message.
Request validation failures are 400s, as OpenAI answers them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import redis
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from api.errors import ApiError, redact_url
from api.openai_schemas import OpenAIErrorBody, OpenAIErrorDetail

log = logging.getLogger(__name__)

_TYPES = {
    401: "authentication_error",
    404: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    503: "server_error",
    507: "server_error",
}
_CODES = {409: "training_slots_full", 413: "file_too_large", 415: "unsupported_media_type", 507: "insufficient_storage"}


class OpenAIError(Exception):
    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status_code, "invalid_request_error" if status_code < 500 else "server_error")

    def response(self) -> JSONResponse:
        body = OpenAIErrorBody(
            error=OpenAIErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        )
        # A busy slot stays busy for the length of a training run: the client should not retry on its own.
        headers = {"x-should-retry": "false"} if self.status_code == 409 else None
        return JSONResponse(status_code=self.status_code, content=body.model_dump(), headers=headers)

    @classmethod
    def from_api_error(cls, exc: ApiError) -> OpenAIError:
        param = None
        if exc.errors:
            loc = [str(p) for p in exc.errors[0].get("loc", [])]
            param = loc[0] if loc else None
        status = 400 if exc.status_code == 422 else exc.status_code
        return cls(status, exc.detail, param=param, code=_CODES.get(status))

    @classmethod
    def from_validation(cls, exc: RequestValidationError) -> OpenAIError:
        problems: dict[str, str] = {}  # where -> the first problem found there
        for err in exc.errors():
            where = ".".join(_field_path(err.get("loc", ())))
            problems.setdefault(where, str(err.get("msg", "invalid")))
        param = next(iter(problems), "") or None
        text = "; ".join(f"{where}: {msg}" if where else msg for where, msg in problems.items())
        return cls(400, f"invalid request: {text}", param=param, code="invalid_request")


def _field_path(loc: Sequence[Any]) -> list[str]:
    """The request field a validation error is about: no `body` prefix, no union member tags."""
    path: list[str] = []
    for part in loc:
        if isinstance(part, int):
            path.append(str(part))
        elif isinstance(part, str) and part.isidentifier():
            if path or part not in ("body", "query", "path"):
                path.append(part)
        else:  # "constrained-int", "literal['auto']": which member of a union was tried
            break
    return path


class OpenAIRoute(APIRoute):
    """An APIRoute whose errors come back in OpenAI's error envelope."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except OpenAIError as exc:
                return exc.response()
            except ApiError as exc:
                return OpenAIError.from_api_error(exc).response()
            except RequestValidationError as exc:
                return OpenAIError.from_validation(exc).response()
            except HTTPException as exc:
                return OpenAIError(exc.status_code, str(exc.detail)).response()
            except redis.RedisError as exc:
                url = redact_url(request.app.state.settings.redis_url)
                log.warning("job store unreachable: %s", exc)
                message = f"the job store (Redis at {url}) is unreachable: {exc}; try again shortly"
                return OpenAIError(503, message, code="store_unavailable").response()

        return handle
