"""The OpenAI fine-tuning surface's shapes: requests in, objects out, and the records kept in Redis.

Field names and values follow OpenAI's `file`, `fine_tuning.job`, `fine_tuning.job.event` and
`fine_tuning.job.checkpoint` objects, so the official `openai` client parses them. Our own job
record (shared.jobs.JobRecord) stays the source of truth; a job object here is a view onto it plus
the few OpenAI-only fields (`*Record` below) kept beside it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.artifacts import Checkpoint
from shared.config import TrainConfig
from shared.jobs import JobRecord, JobStatus
from shared.store import Event

# Our TrainConfig defaults stand in for OpenAI's "auto".
DEFAULT_EPOCHS: int = TrainConfig.model_fields["epochs"].default
DEFAULT_BATCH_SIZE: int = TrainConfig.model_fields["batch_size"].default
BASE_LEARNING_RATE: float = TrainConfig.model_fields["learning_rate"].default
ORGANIZATION_ID = "org-lora-server"  # one tenant: every object belongs to this organization

Auto = Literal["auto"]
PositiveInt = Annotated[int, Field(strict=True, ge=1)]
T = TypeVar("T")

OpenAIJobStatus = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
# Our statuses are a subset of OpenAI's (we validate files at upload, so never `validating_files`).
_STATUS: dict[JobStatus, OpenAIJobStatus] = {
    JobStatus.queued: "queued",
    JobStatus.running: "running",
    JobStatus.succeeded: "succeeded",
    JobStatus.failed: "failed",
    JobStatus.cancelled: "cancelled",
}


# --------------------------------------------------------------------------- requests


class HyperparametersSpec(BaseModel):
    """Supervised hyperparameters; each a number or "auto" (our default)."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: PositiveInt | Auto = Field(default="auto", description=f"Passes over the data; auto = {DEFAULT_EPOCHS}.")
    batch_size: PositiveInt | Auto = Field(
        default="auto", description=f"Sequences per step; auto = {DEFAULT_BATCH_SIZE}."
    )
    learning_rate_multiplier: Annotated[float, Field(gt=0)] | Auto = Field(
        default="auto", description=f"Times our base learning rate {BASE_LEARNING_RATE:g}; auto = 1."
    )

    @property
    def epochs(self) -> int:
        return DEFAULT_EPOCHS if self.n_epochs == "auto" else self.n_epochs

    @property
    def batch(self) -> int:
        return DEFAULT_BATCH_SIZE if self.batch_size == "auto" else self.batch_size

    @property
    def multiplier(self) -> float:
        return 1.0 if self.learning_rate_multiplier == "auto" else float(self.learning_rate_multiplier)

    def resolved(self) -> HyperparametersPublic:
        return HyperparametersPublic(
            n_epochs=self.epochs, batch_size=self.batch, learning_rate_multiplier=self.multiplier
        )


class SupervisedSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: HyperparametersSpec | None = None


class MethodSpec(BaseModel):
    """The newer `method` form; only `supervised` is trained here."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedSpec | None = None
    dpo: dict[str, Any] | None = None
    reinforcement: dict[str, Any] | None = None


class WandbSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    project: str = Field(min_length=1)
    entity: str | None = None
    name: str | None = None
    tags: list[str] | None = None


class IntegrationSpec(BaseModel):
    """An integration as sent and as returned (`{"type": "wandb", "wandb": {...}}`)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["wandb"]
    wandb: WandbSpec


class FineTuningJobCreate(BaseModel):
    """`POST /v1/fine_tuning/jobs`."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="Base model: hub id or local directory.")
    training_file: str = Field(min_length=1, description="A file id from POST /v1/files.")
    validation_file: str | None = Field(default=None, description="A file id; recorded with the job.")
    hyperparameters: HyperparametersSpec | None = Field(default=None, description="Deprecated form of method.")
    method: MethodSpec | None = None
    suffix: str | None = Field(default=None, min_length=1, max_length=64, description="Names the output folder.")
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1, description="Default: our default seed.")
    metadata: dict[str, str] | None = Field(default=None, description="Up to 16 string pairs.")
    integrations: list[IntegrationSpec] | None = None

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return value
        if len(value) > 16:
            raise ValueError("at most 16 key-value pairs")
        for key, item in value.items():
            if len(key) > 64 or len(item) > 512:
                raise ValueError("keys are at most 64 characters, values at most 512")
        return value


class HyperparametersPublic(BaseModel):
    n_epochs: int | Auto
    batch_size: int | Auto
    learning_rate_multiplier: float | Auto

    @classmethod
    def from_config(cls, config: TrainConfig) -> HyperparametersPublic:
        return cls(
            n_epochs=config.epochs,
            batch_size=config.batch_size,
            learning_rate_multiplier=float(f"{config.learning_rate / BASE_LEARNING_RATE:.6g}"),
        )


# --------------------------------------------------------------------------- stored beside our records


class FileRecord(BaseModel):
    """An uploaded training file, as kept in Redis (one hash per file)."""

    model_config = ConfigDict(extra="ignore")

    id: str
    bytes: int
    created_at: int
    filename: str  # the client's name, for display only; never used as a path
    purpose: Literal["fine-tune"]
    path: str  # the normalised JSON Lines file on the volume
    num_records: int


class OpenAIJobRecord(BaseModel):
    """What a /v1 job adds to our JobRecord (one hash per job, beside the job's own)."""

    model_config = ConfigDict(extra="ignore")

    model: str  # as the client named it
    training_file: str
    validation_file: str | None = None
    suffix: str | None = None
    metadata: dict[str, str] | None = None
    integrations: list[IntegrationSpec] = Field(default_factory=list)
    hyperparameters: HyperparametersPublic


# --------------------------------------------------------------------------- responses


class ListPage(BaseModel, Generic[T]):
    """OpenAI's cursor page: pass the last item's id as `after` for the next one."""

    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None

    @classmethod
    def of(cls, data: list[T], has_more: bool) -> ListPage[T]:
        ids = [getattr(item, "id", None) for item in data]
        return cls(data=data, has_more=has_more, first_id=ids[0] if ids else None, last_id=ids[-1] if ids else None)


class FilePublic(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["fine-tune"]
    status: Literal["uploaded", "processed", "error"] = "processed"
    status_details: str | None = None
    expires_at: int | None = None

    @classmethod
    def from_record(cls, record: FileRecord) -> FilePublic:
        return cls(
            id=record.id,
            bytes=record.bytes,
            created_at=record.created_at,
            filename=record.filename,
            purpose=record.purpose,
        )


class FileDeletedPublic(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class SupervisedPublic(BaseModel):
    hyperparameters: HyperparametersPublic


class MethodPublic(BaseModel):
    type: Literal["supervised"] = "supervised"
    supervised: SupervisedPublic


class JobErrorPublic(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJobPublic(BaseModel):
    """OpenAI's `fine_tuning.job` object, read from our job record."""

    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None
    model: str
    fine_tuned_model: str | None  # the adapter folder, once saved
    organization_id: str = ORGANIZATION_ID
    result_files: list[str] = Field(default_factory=list)
    status: OpenAIJobStatus
    validation_file: str | None
    training_file: str
    hyperparameters: HyperparametersPublic
    trained_tokens: int | None
    error: JobErrorPublic | None
    seed: int
    estimated_finish: int | None
    integrations: list[IntegrationSpec]
    metadata: dict[str, str] | None
    user_provided_suffix: str | None
    method: MethodPublic

    @classmethod
    def from_record(cls, record: JobRecord, extra: OpenAIJobRecord | None) -> FineTuningJobPublic:
        hyperparameters = extra.hyperparameters if extra else HyperparametersPublic.from_config(record.config)
        succeeded = record.status is JobStatus.succeeded
        tokens = record.metrics.get("total_tokens") if succeeded else None
        eta = record.progress.eta_seconds if record.status is JobStatus.running else None
        error = None
        if record.status is JobStatus.failed:
            error = JobErrorPublic(code="training_failed", message=record.error or record.message or "failed")
        return cls(
            id=record.id,
            created_at=int(record.created_at),
            finished_at=int(record.finished_at) if record.finished_at is not None else None,
            model=extra.model if extra else record.config.model_name,
            fine_tuned_model=record.model_path if succeeded else None,
            status=_STATUS[record.status],
            # A job submitted through POST /train has no file id: name its stored dataset instead.
            training_file=extra.training_file if extra else Path(record.dataset_path).name,
            validation_file=extra.validation_file if extra else None,
            hyperparameters=hyperparameters,
            trained_tokens=int(tokens) if isinstance(tokens, int | float) else None,
            error=error,
            seed=record.config.seed,
            estimated_finish=int(time.time() + eta) if eta is not None else None,
            integrations=extra.integrations if extra else [],
            metadata=extra.metadata if extra else None,
            user_provided_suffix=extra.suffix if extra else None,
            method=MethodPublic(supervised=SupervisedPublic(hyperparameters=hyperparameters)),
        )


EVENT_ID_PREFIX = "ftevent-"


class FineTuningJobEventPublic(BaseModel):
    """OpenAI's `fine_tuning.job.event`, from one entry of our event stream."""

    id: str  # EVENT_ID_PREFIX + our stream id
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any]

    @classmethod
    def from_event(cls, event: Event) -> FineTuningJobEventPublic:
        level: Literal["info", "warn", "error"] = "info"
        if event.type == "warning":
            level = "warn"
        elif event.data.get("status") == JobStatus.failed.value:
            level = "error"
        if event.type == "metrics":
            # OpenAI's names for ours (`step`, `train_loss`, `valid_loss`); any other figure passes through.
            d = dict(event.data)
            data: dict[str, Any] = {
                "step": d.pop("step", d.pop("current_step", None)),
                "train_loss": d.pop("loss", None),
                "valid_loss": d.pop("eval_loss", None),
                "epoch": d.pop("epoch", d.pop("current_epoch", None)),
                **d,
            }
            return cls(
                id=EVENT_ID_PREFIX + event.id,
                created_at=int(event.ts),
                level=level,
                message=event.message,
                type="metrics",
                data={k: v for k, v in data.items() if v is not None},
            )
        return cls(
            id=EVENT_ID_PREFIX + event.id,
            created_at=int(event.ts),
            level=level,
            message=event.message,
            type="message",
            data={"event": event.type, **event.data},
        )


class CheckpointMetricsPublic(BaseModel):
    step: float | None = None
    train_loss: float | None = None
    train_mean_token_accuracy: float | None = None
    valid_loss: float | None = None
    valid_mean_token_accuracy: float | None = None
    full_valid_loss: float | None = None
    full_valid_mean_token_accuracy: float | None = None


class FineTuningJobCheckpointPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str  # the checkpoint folder on the volume
    fine_tuning_job_id: str
    metrics: CheckpointMetricsPublic
    step_number: int

    @classmethod
    def from_checkpoint(cls, job_id: str, checkpoint: Checkpoint) -> FineTuningJobCheckpointPublic:
        return cls(
            id=checkpoint_id(job_id, checkpoint.step),
            created_at=int(checkpoint.created_at),
            fine_tuned_model_checkpoint=checkpoint.path,
            fine_tuning_job_id=job_id,
            metrics=CheckpointMetricsPublic(step=checkpoint.step, train_loss=checkpoint.loss),
            step_number=checkpoint.step,
        )


def checkpoint_id(job_id: str, step: int) -> str:
    return f"ftckpt-{job_id}-step-{step:06d}"


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorBody(BaseModel):
    """OpenAI's error envelope, which the `openai` client reads into its exceptions."""

    error: OpenAIErrorDetail
