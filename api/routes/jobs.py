"""The jobs resource: list, read, events (paged and live), cancel, pause, resume."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.deps import CeleryDep, JobDep, SettingsDep, SlotsDep, StoreDep
from api.errors import InvalidInput, MalformedRequest, field_error
from api.job_actions import SlotKeeper, cancel_job, pause_job, resume_job
from api.job_actions import get_job as find_job
from api.openai.convert import name_parts
from api.openai.model_names import fine_tuned_model_name
from api.openai.store import OpenAIStore
from shared.job_api import CancelPublic, EventPage, JobPage, JobPublic
from shared.jobs import JobRecord, JobStatus
from shared.store import JobStore
from shared.stream_ids import StreamIdError, parse_stream_id

router = APIRouter(prefix="/jobs", tags=["jobs"])

_STREAM_POLL_S = 0.5
_KEEPALIVE_S = 15.0
_ID_FORM = "<ms>-<seq>, each a whole number up to 2^64-1"
_BAD_CURSOR = {"description": "the event cursor is not a stream id"}


def job_public(store: JobStore, record: JobRecord, queue_position: int | None = None) -> JobPublic:
    """The job as this API shows it: with its base model and, once a training job succeeded, its `ft:`
    name (a /v1 job's built from the model and suffix the client sent, as /v1 and chat name it)."""
    model, suffix = name_parts(record, OpenAIStore(store.client).get_job(record.id))
    named = record.kind == "train" and record.status is JobStatus.succeeded
    ft_name = fine_tuned_model_name(model, suffix, record.id) if named else None
    return JobPublic.from_record(record, queue_position, model=model, fine_tuned_model=ft_name)


def _cursor(value: str | None, where: str, name: str) -> str | None:
    """The canonical stream id of the cursor `name` a client sent; MalformedRequest (400) naming it otherwise."""
    if value is None:
        return None
    try:
        return parse_stream_id(value)
    except StreamIdError as exc:
        raise MalformedRequest(f"{name}: {exc}", problems=[field_error([where, name], str(exc))]) from exc


@router.get("")
def list_jobs(
    store: StoreDep,
    status: Annotated[JobStatus | None, Query(description="only jobs in this state")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
) -> JobPage:
    """Jobs, newest first, `limit` per page."""
    before: float | None = None
    if cursor is not None:
        try:
            before = float(cursor)
        except ValueError:
            before = math.nan
        if not math.isfinite(before):
            raise InvalidInput("cursor: not a cursor this API returned")
    data: list[JobPublic] = []
    next_cursor: str | None = None
    while len(data) < limit:
        rows = store.list_ids(before=before, limit=limit * 2)
        if not rows:
            break
        for job_id, created in rows:
            before = created
            record = store.get(job_id)
            if record is None or (status is not None and record.status is not status):
                continue
            data.append(job_public(store, record))
            if len(data) == limit:
                next_cursor = repr(created)
                break
    has_more = next_cursor is not None and bool(store.list_ids(before=float(next_cursor), limit=1))
    return JobPage(data=data, has_more=has_more, next_cursor=next_cursor if has_more else None)


@router.get("/{job_id}", responses={404: {"description": "no such job"}})
def get_job(job: JobDep, store: StoreDep) -> JobPublic:
    position = store.queue_position(job.id) if job.status is JobStatus.queued else None
    return job_public(store, job, position)


@router.get("/{job_id}/events", responses={400: _BAD_CURSOR, 404: {"description": "no such job"}})
def job_events(
    job: JobDep,
    store: StoreDep,
    after: Annotated[str | None, Query(description=f"last event id seen ({_ID_FORM})")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> EventPage:
    """Events in order: state changes, warnings, per-step metrics (payloads: shared.events)."""
    after = _cursor(after, "query", "after")
    events = store.events(job.id, after=after, limit=limit + 1)
    page = events[:limit]
    return EventPage(data=page, has_more=len(events) > limit, last_id=page[-1].id if page else after)


@router.get(
    "/{job_id}/events/stream",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}, 400: _BAD_CURSOR, 404: {"description": "no such job"}},
)
async def stream_events(
    job: JobDep,
    store: StoreDep,
    request: Request,
    last_event_id: Annotated[str | None, Header(description=f"last event id seen ({_ID_FORM})")] = None,
    after: Annotated[str | None, Query(description=f"last event id seen ({_ID_FORM}); Last-Event-ID wins")] = None,
) -> StreamingResponse:
    """Server-Sent Events; resume with the `Last-Event-ID` header. Ends when the job has ended."""
    # Both are checked before the stream starts: a bad cursor is a 400, never an error mid-stream.
    header, query = _cursor(last_event_id, "header", "Last-Event-ID"), _cursor(after, "query", "after")
    job_id, cursor = job.id, header or query

    async def generate() -> AsyncIterator[bytes]:
        nonlocal cursor
        quiet_since = time.monotonic()
        while not await request.is_disconnected():
            events = await run_in_threadpool(store.events, job_id, after=cursor, limit=500)
            for event in events:
                cursor = event.id
                payload = event.model_dump_json()
                yield f"id: {event.id}\nevent: {event.type}\ndata: {payload}\n\n".encode()
            if events:
                quiet_since = time.monotonic()
                continue
            record = await run_in_threadpool(store.get, job_id)
            if record is None or record.status.terminal:
                yield b"event: end\ndata: {}\n\n"
                return
            if time.monotonic() - quiet_since > _KEEPALIVE_S:
                quiet_since = time.monotonic()
                yield b": keep-alive\n\n"
            await asyncio.sleep(_STREAM_POLL_S)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(generate(), media_type="text/event-stream", headers=headers)


def cancel_response(store: JobStore, job_id: str, slots: SlotKeeper) -> JSONResponse:
    if cancel_job(store, job_id, slots) == "removed":
        body = CancelPublic(job_id=job_id, status="cancelled", message="Job cancelled before it started")
        return JSONResponse(status_code=200, content=body.model_dump())
    body = CancelPublic(job_id=job_id, status="cancelling", message="The worker stops within a few steps")
    return JSONResponse(status_code=202, content=body.model_dump())


@router.post(
    "/{job_id}/cancel",
    response_model=CancelPublic,
    responses={202: {"model": CancelPublic}, 404: {"description": "no such job"}, 409: {"description": "ended"}},
)
def cancel(job_id: str, store: StoreDep, slots: SlotsDep) -> JSONResponse:
    """Cancel a job: a queued job is removed at once, a running one stops within a few steps."""
    return cancel_response(store, job_id, slots)


@router.post(
    "/{job_id}/pause",
    responses={404: {"description": "no such job"}, 409: {"description": "neither queued nor running"}},
)
def pause(job_id: str, store: StoreDep, slots: SlotsDep) -> JobPublic:
    """Pause a job: a running one saves its full state at the next step and frees its slot (`pausing`,
    then `paused`); a queued one is paused at once. `POST .../resume` continues it where it stopped."""
    pause_job(store, job_id, slots)
    return job_public(store, find_job(store, job_id))


@router.post(
    "/{job_id}/resume",
    responses={404: {"description": "no such job"}, 409: {"description": "not paused"}},
)
def resume(job_id: str, store: StoreDep, celery: CeleryDep, settings: SettingsDep) -> JobPublic:
    """Queue a paused job again: it waits for a free slot, then continues from its saved state."""
    resume_job(store, celery, settings, job_id)
    job = find_job(store, job_id)
    return job_public(store, job, store.queue_position(job_id))
