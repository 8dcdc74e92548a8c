"""Settling jobs whose worker vanished: run periodically by the API and by every worker."""

from __future__ import annotations

import logging
import shutil

from celery import Celery

from shared.jobs import TrainTaskPayload
from shared.settings import Settings
from shared.store import JobStore
from shared.tasks import QUEUE, TRAIN_TASK

log = logging.getLogger(__name__)


def publish_train(celery: Celery, job_id: str) -> None:
    """Send the training task by name; the job id doubles as the task id."""
    celery.send_task(
        TRAIN_TASK,
        kwargs={"payload": TrainTaskPayload(job_id=job_id).model_dump()},
        queue=QUEUE,
        task_id=job_id,
    )


def _remove_job_files(settings: Settings, job_id: str) -> None:
    """A pruned job's uploaded datasets and checkpoints (its adapter stays: it is the user's)."""
    shutil.rmtree(settings.base_path / "checkpoints" / job_id, ignore_errors=True)
    for name in (f"{job_id}.jsonl", f"{job_id}.validation.jsonl"):
        (settings.datasets_dir / name).unlink(missing_ok=True)


def reap_once(store: JobStore, celery: Celery, settings: Settings) -> list[str]:
    """Fail or requeue jobs whose lease lapsed (republishing those requeued, whose ids are returned),
    and drop the history of jobs past the retention period."""
    requeued = store.reap(queue_timeout_s=settings.queue_timeout_s)
    for job_id in store.prune(older_than_s=settings.job_retention_days * 86400):
        _remove_job_files(settings, job_id)
    for job_id in requeued:
        log.warning("job %s lost its worker; publishing it again", job_id)
        try:
            publish_train(celery, job_id)
        except Exception as exc:  # the broker is the store here: if it is down, so is everything else
            store.abort(job_id, f"could not requeue after worker loss: {exc}")
    return requeued
