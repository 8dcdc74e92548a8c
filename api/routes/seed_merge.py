"""`POST /merge`: the seed's merge call. Folds an adapter into its base model on a worker and answers
when it is done (or, past `LORA_MERGE_WAIT_S`, with the job to follow)."""

from __future__ import annotations

import asyncio
import time
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from api.deps import CeleryDep, SettingsDep, StoreDep
from api.errors import InvalidInput, field_error
from api.submission import JobRequest, submit_job
from shared.config import TrainConfig
from shared.jobs import JobStatus

router = APIRouter(tags=["seed"])
POLL_S = 0.25


class SeedMergeRequest(BaseModel):
    """The seed's merge body."""

    model_config = ConfigDict(extra="forbid")

    model_name: str = Field(min_length=1, description="the base model (hub id or folder) the adapter was trained on")
    lora_path: str = Field(min_length=1, description="the adapter folder, under base_path")
    model_output: str = Field(min_length=1, description="where the merged model goes, under base_path")


class SeedMergeResult(BaseModel):
    status: Literal["success", "error", "pending"]
    message: str
    output_path: str | None = None
    job_id: str
    job_url: str


@router.post(
    "/merge",
    responses={202: {"model": SeedMergeResult}, 409: {}, 422: {}, 500: {"model": SeedMergeResult}},
)
async def seed_merge(
    body: SeedMergeRequest, request: Request, store: StoreDep, celery: CeleryDep, settings: SettingsDep
) -> JSONResponse:
    try:
        config = TrainConfig(model_name=body.model_name)
    except ValueError as exc:
        raise InvalidInput(f"model_name: {exc}", problems=[field_error(["body", "model_name"], str(exc))]) from exc
    job = JobRequest(
        config=config, merge_adapter=body.lora_path, merge_output=body.model_output, model_field=("body", "model_name")
    )
    record = await run_in_threadpool(submit_job, store, celery, settings, job)
    job_url = f"{str(request.base_url).rstrip('/')}/jobs/{record.id}"
    deadline = time.monotonic() + settings.merge_wait_s
    while time.monotonic() < deadline:
        current = await run_in_threadpool(store.get, record.id)
        if current is not None and current.status is JobStatus.succeeded:
            result = SeedMergeResult(status="success", message="Model merged successfully",
                                     output_path=current.model_path, job_id=record.id, job_url=job_url)  # fmt: skip
            return JSONResponse(result.model_dump(), status_code=200)
        if current is not None and current.status.terminal:
            message = f"merge {current.status.value}: {current.error or current.message}"
            result = SeedMergeResult(status="error", message=message, job_id=record.id, job_url=job_url)
            return JSONResponse(result.model_dump(), status_code=500)
        await asyncio.sleep(POLL_S)
    message = f"the merge is still running after {settings.merge_wait_s:g} s; follow it at {job_url}"
    result = SeedMergeResult(status="pending", message=message, job_id=record.id, job_url=job_url)
    return JSONResponse(result.model_dump(), status_code=202)
