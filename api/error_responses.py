"""The native error body: `{"detail": ..., "errors": [...]?, ...}`, one status per domain error.

OpenAI's envelope for the /v1 routes is api.openai.errors'; both start from the same exceptions.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from api import errors as e
from shared.object_store import StorageUnavailable

log = logging.getLogger(__name__)

# Looked up along each exception's class hierarchy: the most specific entry wins.
STATUS: dict[type[e.ServiceError], int] = {
    e.MalformedRequest: 400,
    e.UnsupportedOption: 400,
    e.NotFound: 404,
    e.UploadStalled: 408,
    e.SlotsBusy: 409,
    e.NoWorkers: 409,
    e.WrongJobState: 409,
    e.OutputInUse: 409,
    e.PayloadTooLarge: 413,
    e.QueueFull: 429,
    e.GenerationQueueFull: 429,
    e.GenerationFailed: 500,
    e.GenerationUnavailable: 503,
    e.GenerationTimedOut: 504,
    e.UnsupportedMediaType: 415,
    e.InvalidInput: 422,
    e.StorageFailed: 500,
    e.BrokerUnavailable: 503,
    e.StoreUnavailable: 503,
    e.ObjectStoreDown: 503,
    e.VolumeFull: 507,
}


def lookup(table: dict[type[e.ServiceError], Any], error: type[e.ServiceError]) -> Any:
    """The table's entry for `error` or the nearest of its base classes that has one."""
    for cls in error.__mro__:
        if cls in table:
            return table[cls]
    raise KeyError(f"no entry for {error.__name__}")


def native_response(exc: e.ServiceError) -> JSONResponse:
    body: dict[str, Any] = {"detail": exc.message, **exc.details()}
    if exc.problems:
        body["errors"] = exc.problems
    return JSONResponse(status_code=lookup(STATUS, type(exc)), content=body)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(e.ServiceError)
    async def _service_error(_: Request, exc: e.ServiceError) -> JSONResponse:
        return native_response(exc)

    async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("job store unreachable: %s", exc)
        return native_response(e.store_unavailable(exc, request.app.state.settings.redis_url))

    for cls in e.REDIS_DOWN:
        app.add_exception_handler(cls, _redis_down)

    async def _object_store_down(_: Request, exc: Exception) -> JSONResponse:
        log.warning("%s", exc)
        return native_response(e.ObjectStoreDown(str(exc)))

    app.add_exception_handler(StorageUnavailable, _object_store_down)
