"""What a request can do to an existing job, for both surfaces: find it, cancel, pause or resume it."""

from __future__ import annotations

from typing import Literal

from celery import Celery

from api.errors import JobAlreadyEnded, JobNotFound, NotPausable
from shared.admission import promote_waiting
from shared.jobs import JobRecord
from shared.settings import Settings
from shared.store import JobStore


def get_job(store: JobStore, job_id: str) -> JobRecord:
    """The job named in a request, or JobNotFound (also for a string that is not a job id)."""
    record = store.get(job_id)
    if record is None:
        raise JobNotFound(job_id)
    return record


def cancel_job(store: JobStore, job_id: str) -> Literal["removed", "requested"]:
    """'removed': it was queued and is cancelled; 'requested': it runs and its worker stops within a few
    steps. JobNotFound or JobAlreadyEnded otherwise."""
    outcome = store.cancel(job_id)
    if outcome == "missing":
        raise JobNotFound(job_id)
    if outcome == "removed":
        return "removed"
    if outcome == "requested":
        return "requested"
    raise JobAlreadyEnded(job_id, outcome)  # the job had ended: `outcome` is its final status


def pause_job(store: JobStore, job_id: str) -> Literal["paused", "pausing"]:
    """'paused': it had not started and holds no slot now; 'pausing': its worker saves its full state
    and stops at the next step. JobNotFound, or NotPausable when it is neither queued nor running."""
    outcome = store.pause(job_id)
    if outcome == "missing":
        raise JobNotFound(job_id)
    if outcome in ("paused", "pausing"):  # asking again is no error
        return "paused" if outcome == "paused" else "pausing"
    raise NotPausable(f"job {job_id!r} is {outcome}: only a queued or running job can be paused", outcome)


def resume_job(store: JobStore, celery: Celery, settings: Settings, job_id: str) -> None:
    """Queue a paused job again (it continues where it stopped); JobNotFound or NotPausable otherwise."""
    outcome = store.resume(job_id)
    if outcome == "missing":
        raise JobNotFound(job_id)
    if outcome != "resumed":
        raise NotPausable(f"job {job_id!r} is {outcome}: only a paused job can be resumed", outcome)
    promote_waiting(store, celery, settings)
