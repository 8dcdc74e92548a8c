"""Errors in OpenAI's shape for the /v1 routes: `{"error": {"message", "type", "param", "code"}}`.

`OpenAIRoute` is the route class of the /v1 routers: every error raised while handling a request
(our domain errors, FastAPI's validation errors, Redis being down) comes back in that envelope, so
the `openai` client raises its matching exception with our message. Request validation failures
are 400s, as OpenAI answers them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, NamedTuple

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from api import errors as e
from api.error_responses import lookup
from api.openai.schemas import OpenAIErrorBody, OpenAIErrorDetail

log = logging.getLogger(__name__)


class Shape(NamedTuple):
    status: int
    type: str
    code: str | None = None
    param: str | None = None  # when the error's own problems name none


_INVALID = "invalid_request_error"
# Looked up along each exception's class hierarchy: the most specific entry wins.
SHAPES: dict[type[e.ServiceError], Shape] = {
    e.MalformedRequest: Shape(400, _INVALID),
    e.UnsupportedOption: Shape(400, _INVALID, "unsupported_method"),
    e.UnsupportedParameter: Shape(400, _INVALID, "unsupported_parameter"),
    e.InvalidInput: Shape(400, _INVALID),
    e.ModelNotAllowed: Shape(400, _INVALID, "model_not_available", "model"),
    e.InvalidDataset: Shape(400, _INVALID, "invalid_file_format"),
    e.UnknownFile: Shape(400, _INVALID, "invalid_file"),
    e.WrongDataKind: Shape(400, _INVALID, "invalid_file_kind"),
    e.JobAlreadyEnded: Shape(400, _INVALID, "job_already_ended", "fine_tuning_job_id"),
    e.NotFound: Shape(404, _INVALID),
    e.JobNotFound: Shape(404, _INVALID, "fine_tuning_job_not_found", "fine_tuning_job_id"),
    e.FileNotFound: Shape(404, _INVALID, "file_not_found", "file_id"),
    e.ModelNotFound: Shape(404, _INVALID, "model_not_found", "model"),
    e.UploadStalled: Shape(408, _INVALID),
    e.SlotsBusy: Shape(409, "conflict_error", "training_slots_full"),
    e.NoWorkers: Shape(409, "conflict_error", "no_training_worker"),
    e.WrongJobState: Shape(409, "conflict_error"),
    e.NotPausable: Shape(400, _INVALID, "invalid_job_state", "fine_tuning_job_id"),
    e.OutputInUse: Shape(409, "conflict_error", "output_in_use"),
    e.PayloadTooLarge: Shape(413, _INVALID, "file_too_large"),
    e.QueueFull: Shape(429, "rate_limit_exceeded", "queue_full"),
    e.GenerationQueueFull: Shape(429, "rate_limit_exceeded", "generation_queue_full"),
    e.GenerationFailed: Shape(500, "server_error", "generation_failed"),
    e.GenerationUnavailable: Shape(503, "server_error", "no_generation_worker"),
    e.GenerationTimedOut: Shape(504, "timeout", "timeout"),
    e.UnsupportedMediaType: Shape(415, _INVALID, "unsupported_media_type"),
    e.StorageFailed: Shape(500, "server_error"),
    e.BrokerUnavailable: Shape(503, "server_error"),
    e.StoreUnavailable: Shape(503, "server_error", "store_unavailable"),
    e.ObjectStoreDown: Shape(503, "server_error", "object_store_unavailable"),
    e.VolumeFull: Shape(507, "server_error", "insufficient_storage"),
}


def _response(status: int, message: str, type: str, param: str | None, code: str | None) -> JSONResponse:
    body = OpenAIErrorBody(error=OpenAIErrorDetail(message=message, type=type, param=param, code=code))
    # A busy slot stays busy for the length of a training run: the client should not retry on its own.
    headers = {"x-should-retry": "false"} if status == 409 else None
    return JSONResponse(status_code=status, content=body.model_dump(), headers=headers)


def openai_response(exc: e.ServiceError) -> JSONResponse:
    shape: Shape = lookup(SHAPES, type(exc))
    return _response(shape.status, exc.message, shape.type, exc.param or shape.param, shape.code)


def _validation_response(exc: RequestValidationError) -> JSONResponse:
    problems: dict[str, str] = {}  # where -> the first problem found there
    for err in exc.errors():
        where = ".".join(_field_path(err.get("loc", ())))
        problems.setdefault(where, str(err.get("msg", "invalid")))
    param = next(iter(problems), "") or None
    text = "; ".join(f"{where}: {msg}" if where else msg for where, msg in problems.items())
    return _response(400, f"invalid request: {text}", _INVALID, param, "invalid_request")


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
            except e.ServiceError as exc:
                return openai_response(exc)
            except e.REDIS_DOWN as exc:
                log.warning("job store unreachable: %s", exc)
                return openai_response(e.store_unavailable(exc, request.app.state.settings.redis_url))
            except RequestValidationError as exc:
                return _validation_response(exc)
            except HTTPException as exc:
                type_ = _INVALID if exc.status_code < 500 else "server_error"
                return _response(exc.status_code, str(exc.detail), type_, None, None)

        return handle
