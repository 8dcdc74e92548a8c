"""The OpenAI fine-tuning surface's shapes: requests in, objects out.

Field names and values follow OpenAI's `file`, `fine_tuning.job`, `fine_tuning.job.event` and
`fine_tuning.job.checkpoint` objects, so the official `openai` client parses them. Our own job
record (shared.jobs.JobRecord) stays the source of truth; api.openai.convert builds these views.
"""

from __future__ import annotations

from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.config import TrainConfig
from shared.files import FilePurpose
from shared.jobs import WandbSpec

# Our TrainConfig defaults stand in for OpenAI's "auto".
DEFAULT_EPOCHS: int = TrainConfig.model_fields["epochs"].default
DEFAULT_BATCH_SIZE: int = TrainConfig.model_fields["batch_size"].default
BASE_LEARNING_RATE: float = TrainConfig.model_fields["learning_rate"].default
DEFAULT_DPO_BETA: float = TrainConfig.model_fields["dpo_beta"].default
ORGANIZATION_ID = "org-lora-server"  # one tenant: every object belongs to this organization

Auto = Literal["auto"]
PositiveInt = Annotated[int, Field(strict=True, ge=1)]
T = TypeVar("T")

OpenAIJobStatus = Literal[
    "validating_files", "queued", "running", "pausing", "paused", "succeeded", "failed", "cancelled"
]


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


class DpoHyperparametersSpec(HyperparametersSpec):
    """DPO hyperparameters: the supervised ones and `beta`."""

    beta: Annotated[float, Field(gt=0, le=100)] | Auto = Field(
        default="auto", description=f"DPO's beta; auto = {DEFAULT_DPO_BETA:g}."
    )

    @property
    def dpo_beta(self) -> float:
        return DEFAULT_DPO_BETA if self.beta == "auto" else float(self.beta)


class SupervisedSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: HyperparametersSpec | None = None


class DpoSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: DpoHyperparametersSpec | None = None


class MethodSpec(BaseModel):
    """The newer `method` form: `supervised` or `dpo` (reinforcement is refused at creation)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedSpec | None = None
    dpo: DpoSpec | None = None
    reinforcement: dict[str, Any] | None = None


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
    integrations: list[IntegrationSpec] | None = Field(
        default=None, max_length=1, description="At most one: the W&B run the job logs to."
    )

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
    purpose: FilePurpose  # "fine-tune": uploaded training data; "fine-tune-results": a job's step_metrics.csv
    status: Literal["uploaded", "processed", "error"] = "processed"
    status_details: str | None = None
    expires_at: int | None = None


class FileDeletedPublic(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class SupervisedPublic(BaseModel):
    hyperparameters: HyperparametersPublic


class DpoHyperparametersPublic(HyperparametersPublic):
    beta: float | Auto


class DpoPublic(BaseModel):
    hyperparameters: DpoHyperparametersPublic


class MethodPublic(BaseModel):
    """`{"type": "supervised", "supervised": {...}}` or `{"type": "dpo", "dpo": {...}}`."""

    type: Literal["supervised", "dpo"] = "supervised"
    supervised: SupervisedPublic | None = None
    dpo: DpoPublic | None = None


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
    queue_position: int | None = None  # ours: while it waits for a slot, its place in line (1 = next)


class FineTuningJobEventPublic(BaseModel):
    """OpenAI's `fine_tuning.job.event`, from one entry of our event stream."""

    id: str  # "ftevent-" + our stream id
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any]


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


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorBody(BaseModel):
    """OpenAI's error envelope, which the `openai` client reads into its exceptions."""

    error: OpenAIErrorDetail
