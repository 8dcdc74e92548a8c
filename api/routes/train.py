"""`POST /train`: the seed's submission endpoint."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from api.datasets import UploadedData, check_disk
from api.deps import CeleryDep, SettingsDep, StoreDep
from api.submission import JobRequest, ensure_room, parse_config, submit_job
from api.uploads import multipart_openapi, receive_upload
from shared.job_api import TrainAccepted

router = APIRouter(tags=["training"])

_BODY = multipart_openapi(
    ["file"],
    {
        "config": {"type": "string", "description": "TrainConfig as a JSON object"},
        "file": {"type": "string", "format": "binary", "description": "chat dataset (JSONL or JSON array)"},
        "validation_file": {
            "type": "string",
            "format": "binary",
            "description": "optional held-out chat dataset: eval loss per epoch",
        },
    },
)


@router.post(
    "/train",
    status_code=202,
    openapi_extra=_BODY,
    responses={
        409: {"description": "every training slot is taken (and `queue` is off)"},
        413: {},
        415: {},
        422: {},
        429: {"description": "`queue` is on and the waiting line is full (LORA_MAX_QUEUED_JOBS)"},
        503: {},
        507: {},
    },
)
async def train(
    request: Request,
    store: StoreDep,
    celery: CeleryDep,
    settings: SettingsDep,
    queue: Annotated[
        bool, Query(description="When every slot is taken, wait in line for one (FIFO) instead of a 409.")
    ] = False,
) -> TrainAccepted:
    """Upload a dataset with a config; the job is admitted to a free training slot and queued (with
    `queue=true`, it waits for a slot when none is free)."""
    await run_in_threadpool(ensure_room, store, settings, wait=queue)
    await run_in_threadpool(check_disk, settings)
    upload = await receive_upload(request, settings)
    try:
        config = parse_config(upload.config_text)
        job = JobRequest(config=config, data=UploadedData(upload.dataset, upload.validation, config.method), wait=queue)
        record = await run_in_threadpool(submit_job, store, celery, settings, job)
    finally:
        upload.discard()
    message = f"Training job accepted: {record.num_records} records, {config.epochs} epochs"
    position = await run_in_threadpool(store.queue_position, record.id)
    if position is not None:
        message += f"; waiting for a free slot (position {position})"
    return TrainAccepted.of(record, message, str(request.base_url), queue_position=position)
