"""OpenAI-compatible fine-tuning jobs: `/v1/fine_tuning/jobs...`, a view onto our own jobs.

A job created here is an ordinary job (same admission, queue, worker and record as `POST /train`);
the OpenAI-only fields are kept beside it. Every job, however submitted, is listed here.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import Annotated

import redis
from celery import Celery
from fastapi import APIRouter, Query, Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from api.deps import CeleryDep, SettingsDep, StoreDep
from api.openai_errors import OpenAIError, OpenAIRoute
from api.openai_schemas import (
    BASE_LEARNING_RATE,
    EVENT_ID_PREFIX,
    FileRecord,
    FineTuningJobCheckpointPublic,
    FineTuningJobCreate,
    FineTuningJobEventPublic,
    FineTuningJobPublic,
    HyperparametersSpec,
    ListPage,
    OpenAIJobRecord,
)
from api.openai_store import OpenAIStore, OpenAIStoreDep, UnknownCursorError
from api.submission import admit, ensure_free_slot, new_job_id, resolve_paths
from shared.artifacts import list_checkpoints as list_saved_checkpoints
from shared.config import TrainConfig
from shared.jobs import JobRecord
from shared.settings import Settings
from shared.store import JobStore

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["openai"], route_class=OpenAIRoute)

_STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,100}$")
# Where a TrainConfig field came from in the request, to name it in errors.
_PARAMS = {
    "model_name": "model",
    "epochs": "hyperparameters.n_epochs",
    "batch_size": "hyperparameters.batch_size",
    "learning_rate": "hyperparameters.learning_rate_multiplier",
    "seed": "seed",
    "model_save_path": "suffix",
}


def _not_found(job_id: str) -> OpenAIError:
    return OpenAIError(
        404,
        f"No fine-tuning job found with id {job_id!r}",
        param="fine_tuning_job_id",
        code="fine_tuning_job_not_found",
    )


def _record(store: JobStore, job_id: str) -> JobRecord:
    record = store.get(job_id) if _JOB_ID.match(job_id) else None
    if record is None:
        raise _not_found(job_id)
    return record


def _view(store: JobStore, ostore: OpenAIStore, job_id: str) -> FineTuningJobPublic:
    return FineTuningJobPublic.from_record(_record(store, job_id), ostore.get_job(job_id))


# --------------------------------------------------------------------------- create


def _hyperparameters(body: FineTuningJobCreate) -> HyperparametersSpec:
    """The hyperparameters from `method.supervised` (preferred) or the deprecated top-level field."""
    top = body.hyperparameters
    if body.method is None:
        return top or HyperparametersSpec()
    if body.method.type != "supervised":
        raise OpenAIError(
            400,
            f"method.type {body.method.type!r} is not supported: this server trains supervised LoRA adapters",
            param="method.type",
            code="unsupported_method",
        )
    nested = body.method.supervised.hyperparameters if body.method.supervised else None
    if nested is None:
        return top or HyperparametersSpec()
    if top is not None and top != nested:
        raise OpenAIError(
            400,
            "hyperparameters differ between the top level and method.supervised; send them under method only",
            param="hyperparameters",
        )
    return nested


def _save_path(suffix: str | None, job_id: str) -> str | None:
    if suffix is None:
        return None
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", suffix).strip(".-") or "model"
    return f"ft-{slug}-{job_id.removeprefix('job-')[:8]}"


def _train_config(body: FineTuningJobCreate, spec: HyperparametersSpec, job_id: str) -> TrainConfig:
    fields: dict[str, object] = {
        "model_name": body.model,
        "epochs": spec.epochs,
        "batch_size": spec.batch,
        "learning_rate": BASE_LEARNING_RATE * spec.multiplier,
        "model_save_path": _save_path(body.suffix, job_id),
    }
    if body.seed is not None:
        fields["seed"] = body.seed
    try:
        return TrainConfig.model_validate(fields)
    except ValidationError as exc:
        err = exc.errors(include_url=False, include_input=False)[0]
        name = str(err["loc"][0]) if err["loc"] else ""
        param = _PARAMS.get(name, name) or None
        raise OpenAIError(400, f"{param}: {err['msg']}", param=param) from exc


def _training_file(ostore: OpenAIStore, file_id: str | None, param: str) -> FileRecord | None:
    if file_id is None:
        return None
    record = ostore.get_file(file_id)
    if record is None:
        raise OpenAIError(400, f"invalid {param}: no file {file_id!r}", param=param, code="invalid_file")
    return record


def _link(src: Path, dest: Path) -> None:
    """Give the job its own name for the file's data (a hard link; a copy across filesystems)."""
    try:
        os.link(src, dest)
    except FileNotFoundError:
        raise
    except OSError:
        shutil.copyfile(src, dest)


def _submit(
    store: JobStore,
    ostore: OpenAIStore,
    celery: Celery,
    settings: Settings,
    *,
    job_id: str,
    config: TrainConfig,
    training: FileRecord,
    validation: FileRecord | None = None,
    extra: OpenAIJobRecord,
) -> JobRecord:
    output_dir, _ = resolve_paths(config, settings, job_id)
    dataset = settings.datasets_dir / f"{job_id}.jsonl"
    held_out = settings.datasets_dir / f"{job_id}.validation.jsonl"
    try:
        _link(Path(training.path), dataset)
        if validation is not None:
            _link(Path(validation.path), held_out)
    except FileNotFoundError as exc:
        dataset.unlink(missing_ok=True)
        raise OpenAIError(
            400, "invalid training_file or validation_file: it was deleted", param="training_file", code="invalid_file"
        ) from exc
    try:
        ostore.put_job(job_id, extra)  # before admission, so the job is never seen without its fields
        return admit(
            store,
            celery,
            settings,
            job_id=job_id,
            config=config,
            dataset=dataset,
            num_records=training.num_records,
            output_dir=output_dir,
            validation=held_out if validation is not None else None,
        )
    except BaseException:
        dataset.unlink(missing_ok=True)
        held_out.unlink(missing_ok=True)
        with contextlib.suppress(redis.RedisError):
            if store.get(job_id) is None:
                ostore.remove_job(job_id)
        raise


@router.post("", max_body_size=256 * 1024, responses={400: {}, 409: {"description": "every slot is taken"}})
async def create_job(
    body: FineTuningJobCreate,
    store: StoreDep,
    ostore: OpenAIStoreDep,
    celery: CeleryDep,
    settings: SettingsDep,
) -> FineTuningJobPublic:
    """Create a supervised LoRA fine-tuning job from an uploaded file; 409 when every slot is taken."""
    await run_in_threadpool(ensure_free_slot, store, settings)
    spec = _hyperparameters(body)
    training = await run_in_threadpool(_training_file, ostore, body.training_file, "training_file")
    assert training is not None
    validation = await run_in_threadpool(_training_file, ostore, body.validation_file, "validation_file")
    job_id = new_job_id()
    config = _train_config(body, spec, job_id)
    extra = OpenAIJobRecord(
        model=body.model,
        training_file=training.id,
        validation_file=body.validation_file,
        suffix=body.suffix,
        metadata=body.metadata,
        integrations=body.integrations or [],
        hyperparameters=spec.resolved(),
    )
    record = await run_in_threadpool(
        lambda: _submit(
            store,
            ostore,
            celery,
            settings,
            job_id=job_id,
            config=config,
            training=training,
            validation=validation,
            extra=extra,
        )
    )
    return FineTuningJobPublic.from_record(record, extra)


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
            raise OpenAIError(400, f"after: no job {cursor!r}", param="after") from exc
        for i, job_id in enumerate(ids):
            cursor = job_id
            record = store.get(job_id)
            if record is None:
                continue
            job = FineTuningJobPublic.from_record(record, ostore.get_job(job_id))
            if any((job.metadata or {}).get(k) != v for k, v in wanted.items()):
                continue
            data.append(job)
            if len(data) == limit:
                return ListPage.of(data, more or i < len(ids) - 1)
        if not more:
            return ListPage.of(data, False)


@router.get("/{fine_tuning_job_id}", responses={404: {}})
def retrieve_job(fine_tuning_job_id: str, store: StoreDep, ostore: OpenAIStoreDep) -> FineTuningJobPublic:
    return _view(store, ostore, fine_tuning_job_id)


@router.post("/{fine_tuning_job_id}/cancel", responses={400: {"description": "already ended"}, 404: {}})
def cancel_job(fine_tuning_job_id: str, store: StoreDep, ostore: OpenAIStoreDep) -> FineTuningJobPublic:
    """A queued job is cancelled at once; a running one stays `running` until its worker stops (a few steps)."""
    job_id = fine_tuning_job_id
    outcome = store.cancel(job_id) if _JOB_ID.match(job_id) else "missing"
    if outcome == "missing":
        raise _not_found(job_id)
    if outcome not in ("removed", "requested"):  # else the job had ended: its final status
        raise OpenAIError(
            400,
            f"job {job_id} has already ended ({outcome}); nothing to cancel",
            param="fine_tuning_job_id",
            code="job_already_ended",
        )
    return _view(store, ostore, job_id)


@router.get("/{fine_tuning_job_id}/events", responses={404: {}})
def list_events(
    fine_tuning_job_id: str,
    store: StoreDep,
    after: Annotated[str | None, Query(description="id of the last event of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> ListPage[FineTuningJobEventPublic]:
    """The job's events, newest first: status changes, warnings, and `metrics` per logged step."""
    _record(store, fine_tuning_job_id)
    before = None
    if after is not None:
        before = after.removeprefix(EVENT_ID_PREFIX)
        if not _STREAM_ID.match(before):
            raise OpenAIError(400, f"after: {after!r} is not an event id this API returned", param="after")
    events = store.events_newest_first(fine_tuning_job_id, before=before, limit=limit + 1)
    page = [FineTuningJobEventPublic.from_event(e) for e in events[:limit]]
    return ListPage.of(page, len(events) > limit)


# --------------------------------------------------------------------------- checkpoints


@router.get("/{fine_tuning_job_id}/checkpoints", responses={404: {}})
def list_checkpoints(
    fine_tuning_job_id: str,
    store: StoreDep,
    settings: SettingsDep,
    after: Annotated[str | None, Query(description="id of the last checkpoint of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> ListPage[FineTuningJobCheckpointPublic]:
    """Checkpoints the worker saved while training, newest first."""
    job_id = _record(store, fine_tuning_job_id).id
    found = list_saved_checkpoints(settings.base_path, job_id)
    checkpoints = [FineTuningJobCheckpointPublic.from_checkpoint(job_id, c) for c in reversed(found)]
    if after is not None:
        ids = [c.id for c in checkpoints]
        if after not in ids:
            raise OpenAIError(400, f"after: no checkpoint {after!r}", param="after")
        checkpoints = checkpoints[ids.index(after) + 1 :]
    return ListPage.of(checkpoints[:limit], len(checkpoints) > limit)
