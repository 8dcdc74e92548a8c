"""`POST /train`: the seed's submission endpoint."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from api.deps import CeleryDep, SettingsDep, StoreDep
from api.schemas import TrainAccepted
from api.submission import (
    admit,
    check_disk,
    ensure_free_slot,
    new_job_id,
    parse_config,
    resolve_paths,
    store_dataset,
)
from api.uploads import receive_upload

router = APIRouter(tags=["training"])

_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "config": {"type": "string", "description": "TrainConfig as a JSON object"},
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "chat dataset (JSONL or JSON array)",
                        },
                        "validation_file": {
                            "type": "string",
                            "format": "binary",
                            "description": "optional held-out chat dataset: eval loss per epoch",
                        },
                    },
                }
            }
        },
    }
}


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
    stored: list[Path] = []
    try:
        config = parse_config(upload.config_text)
        job_id = new_job_id()
        output_dir, _ = resolve_paths(config, settings, job_id)
        assert upload.dataset is not None
        dataset, summary = await run_in_threadpool(store_dataset, upload.dataset, settings, job_id)
        stored.append(dataset)
        validation = None
        if upload.validation is not None:
            validation, _ = await run_in_threadpool(
                lambda: store_dataset(upload.validation, settings, f"{job_id}.validation", part="validation_file")  # type: ignore[arg-type]
            )
            stored.append(validation)
        record = await run_in_threadpool(
            lambda: admit(
                store,
                celery,
                settings,
                job_id=job_id,
                config=config,
                dataset=dataset,
                num_records=summary.num_records,
                output_dir=output_dir,
                validation=validation,
            )
        )
    except BaseException:
        for path in stored:
            path.unlink(missing_ok=True)
        raise
    finally:
        upload.discard()
    base = str(request.base_url).rstrip("/")
    return TrainAccepted(
        job_id=record.id,
        message=f"Training job accepted: {summary.num_records} records, {config.epochs} epochs",
        status_url=f"{base}/status",
        job_url=f"{base}/jobs/{record.id}",
    )
