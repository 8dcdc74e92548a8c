"""What a request can do to an existing job, for both surfaces: find it, cancel, pause or resume it."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Literal

from celery import Celery

from api.errors import JobAlreadyEnded, JobNotFound, NotPausable
from shared.admission import promote_waiting
from shared.jobs import JobRecord
from shared.settings import Settings
from shared.store import JobStore


@dataclass(frozen=True)
class SlotKeeper:
    """What a request that frees a slot or ends a job needs: the broker, to start the job waiting
    longest now rather than at the next reaper round, and the volume, where an ended job's saved
    training state is removed."""

    store: JobStore
    celery: Celery
    settings: Settings

    def slot_freed(self) -> None:
        promote_waiting(self.store, self.celery, self.settings)

    def job_ended(self, job_id: str) -> None:
        shutil.rmtree(self.settings.volume.job_state(job_id), ignore_errors=True)


def get_job(store: JobStore, job_id: str) -> JobRecord:
    """The job named in a request, or JobNotFound (also for a string that is not a job id)."""
    record = store.get(job_id)
    if record is None:
        raise JobNotFound(job_id)
    return record


def cancel_job(store: JobStore, job_id: str, slots: SlotKeeper | None = None) -> Literal["removed", "requested"]:
    """'removed': it was queued (or paused) and is cancelled; 'requested': it runs and its worker stops
    within a few steps. JobNotFound or JobAlreadyEnded otherwise."""
    outcome = store.cancel(job_id)
    if outcome == "missing":
        raise JobNotFound(job_id)
    if outcome == "removed":
        if slots is not None:
            slots.job_ended(job_id)  # a paused job's saved state
            slots.slot_freed()
        return "removed"
    if outcome == "requested":
        return "requested"
    raise JobAlreadyEnded(job_id, outcome)  # the job had ended: `outcome` is its final status


def pause_job(store: JobStore, job_id: str, slots: SlotKeeper | None = None) -> Literal["paused", "pausing"]:
    """'paused': it had not started and holds no slot now; 'pausing': its worker saves its full state
    and stops at the next step. JobNotFound, or NotPausable when it is neither queued nor running."""
    outcome = store.pause(job_id)
    if outcome == "missing":
        raise JobNotFound(job_id)
    if outcome in ("paused", "pausing"):  # asking again is no error
        if outcome == "paused" and slots is not None:
            slots.slot_freed()
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
