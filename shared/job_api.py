"""What the native API sends back: its public response models, one per shape.

Plain pydantic (no web framework), so the HTTP client (`client`) parses the same models the API writes
without installing the server.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from shared.config import TrainConfig
from shared.events import JobEvent
from shared.jobs import SEED_STATUS, JobRecord, JobStatus, Progress
from shared.metrics import TrainingSummary
from shared.workers import Capacity


def shown_progress(record: JobRecord) -> Progress:
    """The progress to show: a job that is not running has no time left, whatever an older record holds
    (records written before the store cleared it on every stop still carry their last ETA)."""
    if record.status in (JobStatus.running, JobStatus.pausing) or record.progress.eta_seconds is None:
        return record.progress
    return record.progress.model_copy(update={"eta_seconds": None})


class FileEntry(BaseModel):
    path: str = Field(description="POSIX path relative to the folder listed")
    size: int = Field(ge=0, description="bytes")
    url: str | None = Field(
        default=None,
        description="with object storage and LORA_STORAGE_PRESIGN_S: a signed URL to the file in the store",
    )


class TrainAccepted(BaseModel):
    job_id: str
    status: Literal["training"] = "training"
    message: str
    status_url: str
    job_url: str
    queue_position: int | None = Field(default=None, description="Its place in the line for a slot (1 = next).")

    @classmethod
    def of(cls, record: JobRecord, message: str, base_url: str, *, queue_position: int | None = None) -> TrainAccepted:
        base = base_url.rstrip("/")
        return cls(
            job_id=record.id,
            message=message,
            status_url=f"{base}/status",
            job_url=f"{base}/jobs/{record.id}",
            queue_position=queue_position,
        )


class SeedStatusPublic(BaseModel):
    """The seed's `/status` shape, plus extra fields; `model_path` only when completed, `error` only on error."""

    status: Literal["idle", "training", "paused", "completed", "error"]
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
    allocated_gpu_memory: float | None = Field(default=None, description="MiB, while a job runs (0 on a CPU worker)")
    reserved_gpu_memory: float | None = Field(default=None, description="MiB, while a job runs (0 on a CPU worker)")
    capacity: Capacity | None = Field(default=None, description="The live training workers and their slots")

    @classmethod
    def idle(cls) -> SeedStatusPublic:
        return cls(status="idle", message="No training job has been submitted yet")

    @classmethod
    def from_record(cls, record: JobRecord) -> SeedStatusPublic:
        p = shown_progress(record)
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
            allocated_gpu_memory=p.allocated_gpu_memory if record.status is JobStatus.running else None,
            reserved_gpu_memory=p.reserved_gpu_memory if record.status is JobStatus.running else None,
        )


class JobPublic(BaseModel):
    id: str
    kind: Literal["train", "merge", "tinker"]
    source_job: str | None
    status: JobStatus
    seed_status: Literal["training", "paused", "completed", "error"]
    created_at: float
    started_at: float | None
    finished_at: float | None
    config: TrainConfig
    num_records: int
    progress: Progress
    metrics: TrainingSummary | None
    model_path: str | None
    message: str
    error: str | None
    attempts: int
    max_attempts: int
    worker: str | None
    cancel_requested: bool
    queue_position: int | None = Field(default=None, description="While it waits for a slot: its place (1 = next).")
    model: str | None = Field(default=None, description="the base model (for a /v1 job, as the client named it)")
    fine_tuned_model: str | None = Field(
        default=None, description="a succeeded training job's `ft:` name (what chat and /v1/models call it)"
    )

    @classmethod
    def from_record(
        cls,
        record: JobRecord,
        queue_position: int | None = None,
        *,
        model: str | None = None,
        fine_tuned_model: str | None = None,
    ) -> JobPublic:
        fields = record.model_dump(exclude={"dataset_path", "output_dir", "validation_path", "progress"})
        return cls(
            seed_status=SEED_STATUS[record.status],  # type: ignore[arg-type]
            queue_position=queue_position,
            progress=shown_progress(record),
            model=model or record.config.model_name,
            fine_tuned_model=fine_tuned_model,
            **fields,
        )


class JobPage(BaseModel):
    data: list[JobPublic]
    has_more: bool
    next_cursor: str | None = None


class EventPage(BaseModel):
    data: list[JobEvent]
    has_more: bool
    last_id: str | None = None


class CancelPublic(BaseModel):
    job_id: str
    status: Literal["cancelled", "cancelling"]
    message: str


class CheckpointPublic(BaseModel):
    name: str
    step: int
    epoch: int
    loss: float | None  # train_loss, under the name this API has always used
    eval_loss: float | None  # full_valid_loss, likewise
    train_mean_token_accuracy: float | None = None
    valid_loss: float | None = None
    valid_mean_token_accuracy: float | None = None
    full_valid_mean_token_accuracy: float | None = None
    created_at: float
    files: list[FileEntry]
    total_bytes: int
    archive_url: str


class CheckpointPage(BaseModel):
    job_id: str
    data: list[CheckpointPublic]


class ArtifactsPublic(BaseModel):
    job_id: str
    status: JobStatus
    model_path: str | None  # the adapter folder, once the job succeeded
    files: list[FileEntry]  # relative to model_path
    total_bytes: int
    archive_url: str | None
    checkpoints: list[CheckpointPublic]
