"""`POST /jobs/{id}/merge`: fold a finished job's adapter into its base model, as a job of its own."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Body, Request
from pydantic import BaseModel, ConfigDict, Field

from api.deps import CeleryDep, SettingsDep, StoreDep
from api.errors import ApiError
from api.schemas import TrainAccepted
from api.submission import admit, new_job_id, resolve_output
from shared.jobs import JobStatus

router = APIRouter(prefix="/jobs", tags=["jobs"])


class MergeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    output_path: str | None = Field(default=None, description="folder under base_path (default: <adapter>-merged)")


@router.post("/{job_id}/merge", status_code=202, responses={404: {}, 409: {}, 422: {}})
def merge(
    job_id: str,
    request: Request,
    store: StoreDep,
    celery: CeleryDep,
    settings: SettingsDep,
    spec: Annotated[MergeSpec | None, Body()] = None,
) -> TrainAccepted:
    source = store.get(job_id)
    if source is None:
        raise ApiError(404, f"no job {job_id!r}")
    if source.kind != "train" or source.status is not JobStatus.succeeded or not source.model_path:
        raise ApiError(409, f"job {job_id!r} has no finished adapter to merge (it is {source.status.value})")
    adapter = source.model_path
    target = (spec.output_path if spec else None) or f"{adapter.rstrip('/').rsplit('/', 1)[-1]}-merged"
    output = resolve_output(settings, target, "output_path", loc="body")
    source_dir = Path(adapter).resolve()
    if output == source_dir or source_dir.is_relative_to(output):
        msg = "would replace the adapter being merged"
        raise ApiError(422, f"output_path: {msg}", [{"loc": ["body", "output_path"], "msg": msg}])
    merge_id = new_job_id()
    record = admit(
        store, celery, settings, job_id=merge_id, config=source.config, dataset=adapter, num_records=0,
        output_dir=output, kind="merge", source_job=job_id,
    )  # fmt: skip
    base = str(request.base_url).rstrip("/")
    return TrainAccepted(
        job_id=record.id,
        message=f"Merge of {job_id} queued",
        status_url=f"{base}/status",
        job_url=f"{base}/jobs/{record.id}",
    )
