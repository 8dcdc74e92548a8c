"""Running one job inside a worker child: claim it, train under a lease, record the outcome."""

from __future__ import annotations

import logging
import os
import socket
import traceback
import uuid
from pathlib import Path

from shared.jobs import JobStatus
from shared.paths import resolve_inside
from shared.settings import get_settings
from shared.store import JobStore, connect
from worker.lease import LeaseKeeper

log = logging.getLogger(__name__)


def worker_name() -> str:
    return get_settings().worker_name or f"{socket.gethostname()}:{os.getppid()}"


def run_job(job_id: str) -> None:
    settings = get_settings()
    store = JobStore(connect(settings.redis_url))
    token = uuid.uuid4().hex
    outcome = store.claim(job_id, token=token, lease_s=settings.lease_ttl_s, worker=worker_name())
    if outcome != "ok":
        # A redelivered message for a job that runs elsewhere or has ended: acknowledge and ignore it.
        log.warning("not running job %s: it is %s", job_id, outcome)
        return
    record = store.get(job_id)
    assert record is not None
    log.info("job %s: training %s", job_id, record.config.model_name)

    error: str | None = None
    result = None
    lora_path = resolve_inside(settings.base_path, record.config.lora_path) if record.config.lora_path else None
    with LeaseKeeper(store, job_id, token, settings.lease_ttl_s) as lease:
        try:
            # torch and transformers load in the child only, under the lease (the import takes seconds).
            from worker.training import train_model

            result = train_model(
                record.config,
                Path(record.dataset_path),
                Path(record.output_dir),
                lora_path=lora_path,
                on_progress=lease.publish,
                on_event=lease.event,
                should_stop=lease.should_stop,
            )
        except Exception as exc:
            log.error("job %s failed:\n%s", job_id, traceback.format_exc())
            error = f"{type(exc).__name__}: {exc}"
        progress = lease.latest
    if lease.fenced.is_set():
        log.warning("job %s: another runner owns it or it was settled; recording nothing", job_id)
        return
    if error is not None:
        store.finish(
            job_id, token=token, status=JobStatus.failed, message="Training failed", error=error, progress=progress
        )
    elif result is not None and result.stopped:
        if lease.cancelled.is_set():
            store.finish(
                job_id,
                token=token,
                status=JobStatus.cancelled,
                message=f"Training cancelled at step {result.steps}/{result.total_steps}",
                error="cancelled by request",
                progress=progress,
                metrics=result.summary(),
            )
        else:
            store.finish(
                job_id,
                token=token,
                status=JobStatus.failed,
                message="Training stopped",
                error="lost contact with Redis for longer than the lease; stopped training",
                progress=progress,
            )
    elif result is not None:
        store.finish(
            job_id,
            token=token,
            status=JobStatus.succeeded,
            message="Training completed",
            model_path=str(result.output_dir),
            progress=progress,
            metrics=result.summary(),
        )
