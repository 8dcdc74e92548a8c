"""Celery tasks: decode the message, run the job, let the runner record the outcome."""

from __future__ import annotations

from typing import Any

from shared.tasks import TRAIN_TASK, TrainTaskPayload
from worker.jobs.celery_app import app


@app.task(name=TRAIN_TASK)
def train(payload: dict[str, Any]) -> None:
    from worker.jobs.runner import run_job  # imports torch: only inside the task's child process

    run_job(TrainTaskPayload.model_validate(payload).job_id)
