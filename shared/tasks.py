"""The training task as both sides know it: its name, its queue, its message, and how it is sent.

The API publishes by name (`send_task`) and never imports worker code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:  # the command-line tool reads QUEUE from here and needs no Celery
    from celery import Celery

TRAIN_TASK = "lora.train"
QUEUE = "lora"


class TrainTaskPayload(BaseModel):
    """The Celery message body: just enough to find the job; the record holds the rest."""

    model_config = ConfigDict(extra="forbid")

    job_id: str


def publish_train(celery: Celery, job_id: str) -> None:
    """Send the training task by name; the job id doubles as the task id."""
    celery.send_task(
        TRAIN_TASK,
        kwargs={"payload": TrainTaskPayload(job_id=job_id).model_dump()},
        queue=QUEUE,
        task_id=job_id,
    )
