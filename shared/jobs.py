"""The job record: lifecycle states, progress, and how the seed's `/status` sees them."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.config import TrainConfig
from shared.metrics import TrainingSummary


class JobStatus(StrEnum):
    queued = "queued"  # accepted: holding a slot and waiting for a worker, or waiting for a free slot
    running = "running"  # a worker holds the lease and trains
    pausing = "pausing"  # running, asked to pause: its worker saves its full state at the next step
    paused = "paused"  # stopped with its state saved, holding no slot; resuming queues it again
    succeeded = "succeeded"  # adapter saved
    failed = "failed"  # error, worker lost, or never picked up
    cancelled = "cancelled"  # stopped on request

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


# The seed's status, as `/status` reports it (the seed's four values, and `paused`).
SEED_STATUS: dict[JobStatus, str] = {
    JobStatus.queued: "training",
    JobStatus.running: "training",
    JobStatus.pausing: "training",
    JobStatus.paused: "paused",  # not over, but not training either: it resumes where it stopped
    JobStatus.succeeded: "completed",
    JobStatus.failed: "error",
    JobStatus.cancelled: "error",
}


class Progress(BaseModel):
    """Live training progress, rewritten by the worker on every step."""

    model_config = ConfigDict(extra="ignore")

    current_step: int = 0
    total_steps: int = 0
    current_epoch: int = 0
    total_epochs: int = 0
    loss: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    tokens_per_second: float | None = None
    step_seconds: float | None = None
    # Smoothed (worker.training.eta); None until the rate is known, and once the job stops running.
    eta_seconds: float | None = None
    elapsed_seconds: float | None = None  # in the training loop, across the sessions of a resumed run
    allocated_gpu_memory: float | None = None  # MiB held by tensors on the worker's GPU (0 on a CPU worker)
    reserved_gpu_memory: float | None = None  # MiB reserved by PyTorch's caching allocator there


class WandbSpec(BaseModel):
    """The Weights & Biases run a job asks to log to (OpenAI's `integrations`); used where the worker
    has W&B configured (WANDB_API_KEY or WANDB_MODE)."""

    model_config = ConfigDict(extra="forbid")

    project: str = Field(min_length=1, max_length=128)
    entity: str | None = Field(default=None, max_length=128)
    name: str | None = Field(default=None, max_length=128, description="the run's name (default: the job id)")
    tags: list[str] | None = Field(default=None, max_length=64)


class JobRecord(BaseModel):
    """Everything known about one job; stored as a Redis hash (see shared.store)."""

    model_config = ConfigDict(extra="ignore")

    id: str
    # merge: fold a finished job's adapter into its base model; tinker: host a Tinker training client's model
    # (shared.tinker_store), running the calls its client sends until the client goes idle or its session ends
    kind: Literal["train", "merge", "tinker"] = "train"
    status: JobStatus
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    config: TrainConfig
    dataset_path: str
    validation_path: str | None = None
    source_job: str | None = None  # for merge jobs: the training job whose adapter is merged
    tinker_model: str | None = None  # for tinker jobs: the Tinker model id the job hosts (shared.tinker_store)
    # Resolved once, at submission; the worker loads these and never resolves `config`'s names again.
    model_dir: str | None = None  # the base model as loaded: its folder under base_path, else the name (hub id)
    # The base's one name however it was spelled (api.base_models' canonical name): `ft:` names use it.
    base_model: str | None = None
    adapter_dir: str | None = None  # the adapter a training job continues: `config.lora_path` inside base_path
    num_records: int = 0
    output_dir: str
    model_path: str | None = None
    # The base path the paths above were named under (the API's). A host with another base path (hosts that
    # share no disk, only the object store) finds them under its own: `shared.volume.Volume.localize`.
    volume_base: str | None = None
    message: str = ""
    error: str | None = None
    attempts: int = 0
    max_attempts: int = 1
    worker: str | None = None
    cancel_requested: bool = False
    progress: Progress = Field(default_factory=Progress)
    metrics: TrainingSummary | None = None  # what the worker reports when a training run ends
    wandb: WandbSpec | None = None  # the W&B run to log to, when the job asked for one
