"""The waiting line's hand-off: jobs that waited for a slot get one as slots free up.

Any process may call `promote_waiting` (the API after a cancel or resume, every reaper round in the
API and in every worker, a worker as soon as its job ends): the move into a slot is one Lua script,
so each waiting job is handed to exactly one caller, which publishes its task.
"""

from __future__ import annotations

import logging

from celery import Celery

from shared import workers
from shared.settings import Settings
from shared.store import JobStore
from shared.tasks import publish_train

log = logging.getLogger(__name__)


def publish_or_fail(store: JobStore, celery: Celery, job_id: str, *, what: str = "enqueue the job") -> Exception | None:
    """Publish a job that holds a slot; when the broker refuses it, fail the job (freeing its slot) and
    return the broker's error."""
    try:
        publish_train(celery, job_id)
    except Exception as exc:  # the broker is the store here: if it is down, so is everything else
        log.error("could not publish job %s: %s", job_id, exc)
        store.abort(job_id, f"could not {what}: {exc}")
        return exc
    return None


def promote_waiting(store: JobStore, celery: Celery, settings: Settings) -> list[str]:
    """Give free slots to the longest-waiting jobs and publish their tasks; returns their ids."""
    slots = workers.capacity(store.client, settings)
    promoted = store.promote(max_slots=slots, queue_timeout_s=settings.queue_timeout_s)
    for job_id in promoted:
        log.info("job %s: a slot is free; publishing it", job_id)
        publish_or_fail(store, celery, job_id)
    return promoted
