"""`POST /jobs/{id}/merge`: fold a finished job's adapter into its base model, as a job of its own."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Request
from pydantic import BaseModel, ConfigDict, Field

from api.deps import CeleryDep, JobDep, SettingsDep, StoreDep
from api.errors import WrongJobState
from api.submission import JobRequest, submit_job
from shared.job_api import TrainAccepted
from shared.jobs import JobStatus

router = APIRouter(prefix="/jobs", tags=["jobs"])


class MergeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    output_path: str | None = Field(default=None, description="folder under base_path (default: <adapter>-merged)")


@router.post("/{job_id}/merge", status_code=202, responses={404: {}, 409: {}, 422: {}})
def merge(
    source: JobDep,
    request: Request,
    store: StoreDep,
    celery: CeleryDep,
    settings: SettingsDep,
    spec: Annotated[MergeSpec | None, Body()] = None,
) -> TrainAccepted:
    if source.kind != "train" or source.status is not JobStatus.succeeded or not source.model_path:
        raise WrongJobState(
            f"job {source.id!r} has no finished adapter to merge (it is {source.status.value})", source.status.value
        )
    job = JobRequest(config=source.config, merge_of=source, merge_output=spec.output_path if spec else None)
    record = submit_job(store, celery, settings, job)
    return TrainAccepted.of(record, f"Merge of {source.id} queued", str(request.base_url))
