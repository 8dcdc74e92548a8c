"""What a request can do to an existing job, for both surfaces: find it, cancel it."""

from __future__ import annotations

from typing import Literal

from api.errors import JobAlreadyEnded, JobNotFound
from shared.jobs import JobRecord
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
