"""`POST /train`: the seed's submission endpoint."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from api.datasets import UploadedData, check_disk
from api.deps import CeleryDep, SettingsDep, StoreDep
from api.schemas import TrainAccepted
from api.submission import JobRequest, ensure_free_slot, parse_config, submit_job
from api.uploads import multipart_openapi, receive_upload

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
    responses={409: {"description": "every training slot is taken"}, 413: {}, 415: {}, 422: {}, 503: {}, 507: {}},
)
async def train(request: Request, store: StoreDep, celery: CeleryDep, settings: SettingsDep) -> TrainAccepted:
    """Upload a dataset with a config; the job is admitted to a free training slot and queued."""
    await run_in_threadpool(ensure_free_slot, store, settings)
    await run_in_threadpool(check_disk, settings)
    upload = await receive_upload(request, settings)
    try:
        config = parse_config(upload.config_text)
        job = JobRequest(config=config, data=UploadedData(upload.dataset, upload.validation))
        record = await run_in_threadpool(submit_job, store, celery, settings, job)
    finally:
        upload.discard()
    message = f"Training job accepted: {record.num_records} records, {config.epochs} epochs"
    return TrainAccepted.of(record, message, str(request.base_url))
