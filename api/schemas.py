"""What the API sends back: response models, one per shape."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from shared.config import TrainConfig
from shared.jobs import SEED_STATUS, JobRecord, JobStatus, Progress
from shared.store import Event


class TrainAccepted(BaseModel):
    job_id: str
    status: Literal["training"] = "training"
    message: str
    status_url: str
    job_url: str


class SeedStatusPublic(BaseModel):
    """The seed's `/status` shape, plus extra fields; `model_path` only when completed, `error` only on error."""

    status: Literal["idle", "training", "completed", "error"]
    message: str
    current_step: int = 0
    total_steps: int = 0
    current_epoch: int = 0
    total_epochs: int = 0
    model_path: str | None = None
    error: str | None = None
    job_id: str | None = None
    job_status: JobStatus | None = None
    loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None

    @classmethod
    def idle(cls) -> SeedStatusPublic:
        return cls(status="idle", message="No training job has been submitted yet")

    @classmethod
    def from_record(cls, record: JobRecord) -> SeedStatusPublic:
        p = record.progress
        seed_status = SEED_STATUS[record.status]
        message = record.message or {"training": "Training...", "completed": "Training completed"}.get(seed_status, "")
        if record.status is JobStatus.queued:
            message = record.message or "Queued, waiting for a worker"
        return cls(
            status=seed_status,  # type: ignore[arg-type]
            message=message,
            current_step=p.current_step,
            total_steps=p.total_steps,
            current_epoch=p.current_epoch,
            total_epochs=p.total_epochs or record.config.epochs,
            model_path=record.model_path if record.status is JobStatus.succeeded else None,
            error=record.error if seed_status == "error" else None,
            job_id=record.id,
            job_status=record.status,
            loss=p.loss,
            learning_rate=p.learning_rate,
            tokens_per_second=p.tokens_per_second,
            eta_seconds=p.eta_seconds,
        )


class JobPublic(BaseModel):
    id: str
    kind: Literal["train", "merge"]
    source_job: str | None
    status: JobStatus
    seed_status: Literal["training", "completed", "error"]
    created_at: float
    started_at: float | None
    finished_at: float | None
    config: TrainConfig
    num_records: int
    progress: Progress
    metrics: dict[str, Any]
    model_path: str | None
    message: str
    error: str | None
    attempts: int
    max_attempts: int
    worker: str | None
    cancel_requested: bool

    @classmethod
    def from_record(cls, record: JobRecord) -> JobPublic:
        return cls(
            seed_status=SEED_STATUS[record.status],  # type: ignore[arg-type]
            **record.model_dump(exclude={"dataset_path", "output_dir", "validation_path"}),
        )


class JobPage(BaseModel):
    data: list[JobPublic]
    has_more: bool
    next_cursor: str | None = None


class EventPublic(BaseModel):
    id: str
    type: str
    created_at: float
    message: str
    data: dict[str, Any]

    @classmethod
    def from_event(cls, event: Event) -> EventPublic:
        return cls(id=event.id, type=event.type, created_at=event.ts, message=event.message, data=event.data)


class EventPage(BaseModel):
    data: list[EventPublic]
    has_more: bool
    last_id: str | None = None


class CancelPublic(BaseModel):
    job_id: str
    status: Literal["cancelled", "cancelling"]
    message: str
