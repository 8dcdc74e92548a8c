"""`retrieve_future`: a long poll on one future (Redis, asynchronously: a waiting client holds no thread; it
blocks on the future's settled signal, so a result is answered the moment the worker writes it).

Pending: answered `try_again` after LORA_TINKER_POLL_S (the SDK polls again at once). Done: the result in the
SDK's shape for its call, protobuf for forward_backward and samples. Failed: HTTP 200 `{"error", "category"}`.
While it waits, the future's model is looked after (api.tinker.hosting.check_pending): a lost host fails it,
an idle one with calls queued is started again, a host waiting for a slot is reported as `paused_capacity`.
"""

from __future__ import annotations

import time
from typing import Any, cast

import redis.asyncio as aioredis
from celery import Celery
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from api.deps import CeleryDep, SettingsDep, StoreDep
from api.tinker import hosting
from api.tinker.errors import not_found
from api.tinker.schemas import RetrieveFuture, parse
from api.tinker.wire import PROTOBUF, encode_forward_result, encode_sample_result
from shared import keys
from shared import tinker_store as ts
from shared.settings import Settings
from shared.store import JobStore
from shared.tinker_ops import (
    CreatedResult,
    ForwardResult,
    LoadResult,
    OptimStepResult,
    SampleResult,
    SaveResult,
    UnloadResult,
)

router = APIRouter(prefix="/api/v1", tags=["tinker"])
CHECK_HOST_EVERY_S = 1.0


def result_response(future: ts.Future) -> Response:
    result = future.result
    if isinstance(result, ForwardResult):
        return Response(encode_forward_result(result), media_type=PROTOBUF)
    if isinstance(result, SampleResult):
        return Response(encode_sample_result(result), media_type=PROTOBUF)
    body: dict[str, Any]
    if isinstance(result, CreatedResult | UnloadResult):
        body = {"model_id": result.model_id}
    elif isinstance(result, OptimStepResult):
        body = {"metrics": result.metrics}
    elif isinstance(result, SaveResult):
        body = {"path": result.path}
        if result.sampling_session_id is not None:
            body["sampling_session_id"] = result.sampling_session_id
    elif isinstance(result, LoadResult):
        body = {"path": result.path}
    else:  # settled without a result: nothing to say but that it is done
        body = {}
    return JSONResponse(body)


def _check(
    store: JobStore, celery: Celery, settings: Settings, request_id: str, model_id: str, call: str
) -> hosting.HostState:
    return hosting.check_pending(store, celery, settings, request_id, model_id, call)


@router.post("/retrieve_future")
async def retrieve_future(request: Request, store: StoreDep, celery: CeleryDep, settings: SettingsDep) -> Response:
    body = await parse(request, RetrieveFuture, "retrieve_future", settings)
    client: aioredis.Redis = request.app.state.generation.client
    key = keys.tinker_future_key(body.request_id)
    deadline = time.monotonic() + settings.tinker_poll_s
    # its host is looked after once the future has waited a while: most results come back well before
    next_check = time.monotonic() + CHECK_HOST_EVERY_S
    state = hosting.HostState("active")
    while True:
        fields = cast(dict[str, str], await client.hgetall(key))
        future = ts.read_future(fields)
        if future is None:
            raise not_found("retrieve_future", "request_id", f"no future {body.request_id[:100]!r}")
        if future.state == "done":
            return result_response(future)
        if future.state == "failed":
            return JSONResponse({"error": future.error or "failed", "category": future.category})
        now = time.monotonic()
        if future.model_id and now >= next_check:
            call = fields.get("call") or "the call"
            state = await run_in_threadpool(_check, store, celery, settings, body.request_id, future.model_id, call)
            next_check = now + CHECK_HOST_EVERY_S
            continue  # the check may have settled it
        if now >= deadline:
            answer: dict[str, Any] = {
                "type": "try_again",
                "request_id": body.request_id,
                "queue_state": state.queue_state,
            }
            if state.reason:
                answer["queue_state_reason"] = state.reason
            return JSONResponse(answer)
        # woken as soon as the future is settled (shared.tinker_store._settle), else to look after its host
        wait = max(0.01, min(deadline, next_check) - now)
        await client.blpop([keys.tinker_settled_key(body.request_id)], timeout=wait)
