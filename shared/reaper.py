"""Settling jobs whose worker vanished: run periodically by the API and by every worker."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from celery import Celery

from shared import keys
from shared.admission import promote_waiting, publish_or_fail
from shared.jobs import JobStatus
from shared.outputs import adapter_summary, is_jobs_adapter
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


def _settle_finished(store: JobStore) -> None:
    """Record as succeeded the lapsed jobs whose complete adapter one of their runs saved (where this host
    sees the job's output folder): their runner finished but could not record it in time."""
    for job_id in store.lapsed_running():
        record = store.get(job_id)
        if record is None or record.kind != "train" or record.status not in (JobStatus.running, JobStatus.pausing):
            continue
        output = Path(record.output_dir)
        if not is_jobs_adapter(output, job_id):
            continue
        metrics = adapter_summary(output)
        if metrics is not None:
            metrics.losses = metrics.losses[-1000:]  # as the runner records it
        if store.settle_complete(job_id, model_path=str(output), metrics=metrics):
            log.warning("job %s: its lease lapsed after its adapter was saved; recorded as succeeded", job_id)


def _sweep_states(store: JobStore, volume: Volume) -> None:
    """Saved training state is kept only while its job can still continue from it (running, queued for
    another run, paused): gigabytes each for a real model, it goes once the job has ended or is gone."""
    for job_id, folder in volume.saved_states():
        status = store.client.hget(keys.job_key(job_id), "status")
        if status is None or JobStatus(str(status)).terminal:
            shutil.rmtree(folder, ignore_errors=True)
            log.info("job %s has ended: its saved training state was removed", job_id)


def reap_once(store: JobStore, celery: Celery, settings: Settings) -> list[str]:
    """Fail or requeue jobs whose lease lapsed (republishing those requeued, whose ids are returned;
    those whose adapter was saved are recorded as succeeded), hand free slots to waiting jobs, drop the
    history of jobs past the retention period and the saved state of jobs that can no longer resume."""
    _settle_finished(store)
    requeued = store.reap(queue_timeout_s=settings.queue_timeout_s)
    for job_id in store.prune(older_than_s=settings.job_retention_days * 86400):
        _remove_job_files(settings.volume, job_id)
    for job_id in requeued:
        log.warning("job %s lost its worker; publishing it again", job_id)
        publish_or_fail(store, celery, job_id, what="requeue after worker loss")
    promote_waiting(store, celery, settings)
    _sweep_states(store, settings.volume)
    return requeued
