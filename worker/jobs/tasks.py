"""Celery tasks: decode the message, run the job, let the runner record the outcome."""

from __future__ import annotations

from typing import Any

from shared.settings import get_settings
from shared.tasks import TRAIN_TASK, TrainTaskPayload
from worker.jobs.celery_app import app


@app.task(name=TRAIN_TASK)
def train(payload: dict[str, Any]) -> None:
    from worker.jobs import child, shutdown
    from worker.jobs.runner import run_job  # imports torch: only inside the task's child process

    # The clean-up after the job stays under the job's SIGTERM handler too: billiard's would exit from inside
    # whatever finalizer its garbage collection runs, with a traceback.
    with shutdown.running_job():
        try:
            run_job(TrainTaskPayload.model_validate(payload).job_id)
        finally:  # the job's objects are unreachable here: what memory is still held, the next job would inherit
            child.after_job(get_settings())
