"""OpenAI-compatible fine-tuning jobs: `/v1/fine_tuning/jobs...`, a view onto our own jobs.

A job created here is an ordinary job (same admission, queue, worker and record as `POST /train`);
the OpenAI-only fields are kept beside it. Every job, however submitted, is listed here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from starlette.concurrency import run_in_threadpool

from api import job_actions
from api.artifacts import list_checkpoints as saved_checkpoints
from api.datasets import StoredData
from api.deps import CeleryDep, SettingsDep, SlotsDep, StoreDep
from api.errors import MalformedRequest, UnknownFile, WrongDataKind, field_error
from api.openai import convert
from api.openai.errors import OpenAIRoute
from api.openai.records import FileRecord, OpenAIJobRecord
from api.openai.schemas import (
    FineTuningJobCheckpointPublic,
    FineTuningJobCreate,
    FineTuningJobEventPublic,
    FineTuningJobPublic,
    ListPage,
)
from api.openai.store import JobFields, OpenAIStore, OpenAIStoreDep, UnknownCursorError
from api.submission import JobRequest, ensure_room, submit_job
from shared.config import TrainingMethod
from shared.files import UPLOAD_PURPOSE
from shared.job_ids import new_job_id
from shared.jobs import JobRecord, JobStatus
from shared.preference import kind_problem
from shared.store import JobStore

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["openai"], route_class=OpenAIRoute)


def _job(fine_tuning_job_id: str, store: StoreDep) -> JobRecord:
    return job_actions.get_job(store, fine_tuning_job_id)


FineTuningJobDep = Annotated[JobRecord, Depends(_job)]


def _view(store: JobStore, ostore: OpenAIStore, job_id: str) -> FineTuningJobPublic:
    return _public(store, ostore, job_actions.get_job(store, job_id))


def _public(store: JobStore, ostore: OpenAIStore, record: JobRecord) -> FineTuningJobPublic:
    position = store.queue_position(record.id) if record.status is JobStatus.queued else None
    return convert.job_public(
        record, ostore.get_job(record.id), ostore.result_files(record.id), queue_position=position
    )


# --------------------------------------------------------------------------- create


def _training_file(ostore: OpenAIStore, file_id: str, param: str, method: TrainingMethod) -> FileRecord:
    """The uploaded file, if it holds the kind of data `method` trains on."""
    record = ostore.get_file(file_id)
    if record is None:
        raise UnknownFile(f"invalid {param}: no file {file_id!r}", problems=[field_error([param], "no such file")])
    if record.purpose != UPLOAD_PURPOSE:
        msg = f"file {file_id!r} is a {record.purpose} file, not training data (purpose {UPLOAD_PURPOSE!r})"
        raise UnknownFile(f"invalid {param}: {msg}", problems=[field_error([param], "not a fine-tune file")])
    problem = kind_problem(record.kind, method)
    if problem is not None:
        raise WrongDataKind(f"invalid {param} {file_id!r}: {problem}", problems=[field_error([param], problem)])
    return record


@router.post("", max_body_size=256 * 1024, responses={400: {}, 429: {"description": "the waiting line is full"}})
async def create_job(
    body: FineTuningJobCreate,
    store: StoreDep,
    ostore: OpenAIStoreDep,
    celery: CeleryDep,
    settings: SettingsDep,
) -> FineTuningJobPublic:
    """Create a supervised or DPO LoRA fine-tuning job from an uploaded file. It starts when a slot is free, waiting in line
    (FIFO, `queued`) until then; 429 when LORA_MAX_QUEUED_JOBS jobs already wait."""
    await run_in_threadpool(ensure_room, store, settings, wait=True)
    choice = convert.method_choice(body)
    method = choice.config_method
    training = await run_in_threadpool(_training_file, ostore, body.training_file, "training_file", method)
    validation = None
    if body.validation_file is not None:
        validation = await run_in_threadpool(_training_file, ostore, body.validation_file, "validation_file", method)
    job_id = new_job_id()
    extra = OpenAIJobRecord(
        model=body.model,
        training_file=training.id,
        validation_file=body.validation_file,
        suffix=body.suffix,
        metadata=body.metadata,
        hyperparameters=convert.resolved(choice.spec),
    )
    job = JobRequest(
        job_id=job_id,
        config=convert.train_config(body, choice, job_id),
        data=StoredData(Path(training.path), training.num_records, Path(validation.path) if validation else None),
        wandb=body.integrations[0].wandb if body.integrations else None,
        companion=JobFields(ostore, extra),
        wait=True,
        model_field=("model",),
    )
    record = await run_in_threadpool(submit_job, store, celery, settings, job)
    return await run_in_threadpool(_public, store, ostore, record)


# --------------------------------------------------------------------------- read, cancel


def _metadata_filter(request: Request) -> dict[str, str]:
    """`metadata[key]=value` query parameters (the client's deep-object form)."""
    return {
        name[len("metadata[") : -1]: value
        for name, value in request.query_params.items()
        if name.startswith("metadata[") and name.endswith("]")
    }


@router.get("")
def list_jobs(
    request: Request,
    store: StoreDep,
    ostore: OpenAIStoreDep,
    after: Annotated[str | None, Query(description="id of the last job of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> ListPage[FineTuningJobPublic]:
    """All jobs, newest first; `metadata[key]=value` keeps only jobs carrying that metadata."""
    wanted = _metadata_filter(request)
    data: list[FineTuningJobPublic] = []
    cursor = after
    while True:
        try:
            ids, more = ostore.job_ids(after=cursor, limit=limit)
        except UnknownCursorError as exc:
            raise MalformedRequest(
                f"after: no job {cursor!r}", problems=[field_error(["after"], "no such job")]
            ) from exc
        for i, job_id in enumerate(ids):
            cursor = job_id
            record = store.get(job_id)
            if record is None:
                continue
            job = _public(store, ostore, record)
            if any((job.metadata or {}).get(k) != v for k, v in wanted.items()):
                continue
            data.append(job)
            if len(data) == limit:
                return ListPage.of(data, more or i < len(ids) - 1)
        if not more:
            return ListPage.of(data, False)


@router.get("/{fine_tuning_job_id}", responses={404: {}})
def retrieve_job(job: FineTuningJobDep, store: StoreDep, ostore: OpenAIStoreDep) -> FineTuningJobPublic:
    return _public(store, ostore, job)


@router.post("/{fine_tuning_job_id}/cancel", responses={400: {"description": "already ended"}, 404: {}})
def cancel_job(
    fine_tuning_job_id: str, store: StoreDep, ostore: OpenAIStoreDep, slots: SlotsDep
) -> FineTuningJobPublic:
    """A queued job is cancelled at once; a running one stays `running` until its worker stops (a few steps)."""
    job_actions.cancel_job(store, fine_tuning_job_id, slots)
    return _view(store, ostore, fine_tuning_job_id)


@router.post("/{fine_tuning_job_id}/pause", responses={400: {"description": "neither queued nor running"}, 404: {}})
def pause_job(fine_tuning_job_id: str, store: StoreDep, ostore: OpenAIStoreDep, slots: SlotsDep) -> FineTuningJobPublic:
    """A running job saves its full state at the next step and frees its slot (`pausing`, then `paused`);
    a queued one is paused at once."""
    job_actions.pause_job(store, fine_tuning_job_id, slots)
    return _view(store, ostore, fine_tuning_job_id)


@router.post("/{fine_tuning_job_id}/resume", responses={400: {"description": "not paused"}, 404: {}})
def resume_job(
    fine_tuning_job_id: str, store: StoreDep, ostore: OpenAIStoreDep, celery: CeleryDep, settings: SettingsDep
) -> FineTuningJobPublic:
    """Queue a paused job again: it waits for a free slot, then continues from its saved state."""
    job_actions.resume_job(store, celery, settings, fine_tuning_job_id)
    return _view(store, ostore, fine_tuning_job_id)


@router.get("/{fine_tuning_job_id}/events", responses={404: {}})
def list_events(
    job: FineTuningJobDep,
    store: StoreDep,
    after: Annotated[str | None, Query(description="id of the last event of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> ListPage[FineTuningJobEventPublic]:
    """The job's events, newest first: status changes, warnings, and `metrics` per logged step."""
    events = store.events_newest_first(job.id, before=convert.stream_cursor(after), limit=limit + 1)
    page = [convert.event_public(e) for e in events[:limit]]
    return ListPage.of(page, len(events) > limit)


# --------------------------------------------------------------------------- checkpoints


@router.get("/{fine_tuning_job_id}/checkpoints", responses={404: {}})
def list_checkpoints(
    job: FineTuningJobDep,
    settings: SettingsDep,
    ostore: OpenAIStoreDep,
    after: Annotated[str | None, Query(description="id of the last checkpoint of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> ListPage[FineTuningJobCheckpointPublic]:
    """Checkpoints the worker saved while training, newest first."""
    found = saved_checkpoints(settings.volume, job.id, store=settings.store)
    extra = ostore.get_job(job.id)
    checkpoints = [convert.checkpoint_public(job, extra, c) for c in reversed(found)]
    if after is not None:
        ids = [c.id for c in checkpoints]
        if after not in ids:
            raise MalformedRequest(f"after: no checkpoint {after!r}", problems=[field_error(["after"], "unknown id")])
        checkpoints = checkpoints[ids.index(after) + 1 :]
    return ListPage.of(checkpoints[:limit], len(checkpoints) > limit)
