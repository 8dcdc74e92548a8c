"""Settling jobs whose worker vanished: run periodically by the API and by every worker."""

from __future__ import annotations

import logging
import shutil

from celery import Celery

from shared.admission import promote_waiting, publish_or_fail
from shared.settings import Settings
from shared.store import JobStore
from shared.volume import Volume

log = logging.getLogger(__name__)


def _remove_job_files(volume: Volume, job_id: str) -> None:
    """A pruned job's uploaded datasets, checkpoints and saved state (its adapter stays: it is the user's)."""
    shutil.rmtree(volume.job_checkpoints(job_id), ignore_errors=True)
    shutil.rmtree(volume.job_state(job_id), ignore_errors=True)
    for path in volume.job_datasets(job_id):
        path.unlink(missing_ok=True)


def reap_once(store: JobStore, celery: Celery, settings: Settings) -> list[str]:
    """Fail or requeue jobs whose lease lapsed (republishing those requeued, whose ids are returned),
    hand free slots to waiting jobs, and drop the history of jobs past the retention period."""
    requeued = store.reap(queue_timeout_s=settings.queue_timeout_s)
    for job_id in store.prune(older_than_s=settings.job_retention_days * 86400):
        _remove_job_files(settings.volume, job_id)
    for job_id in requeued:
        log.warning("job %s lost its worker; publishing it again", job_id)
        publish_or_fail(store, celery, job_id, what="requeue after worker loss")
    promote_waiting(store, celery, settings)
    return requeued
