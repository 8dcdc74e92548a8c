"""The OpenAI surface's conversion to and from our jobs: requests into a TrainConfig, our records,
events and checkpoints into OpenAI's objects."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from api.artifacts import Checkpoint
from api.errors import InvalidInput, MalformedRequest, UnsupportedOption, field_error
from api.openai.model_names import checkpoint_model_name, fine_tuned_model_name
from api.openai.records import FileRecord, OpenAIJobRecord
from api.openai.schemas import (
    BASE_LEARNING_RATE,
    CheckpointMetricsPublic,
    DpoHyperparametersPublic,
    DpoHyperparametersSpec,
    DpoPublic,
    FilePublic,
    FineTuningJobCheckpointPublic,
    FineTuningJobCreate,
    FineTuningJobEventPublic,
    FineTuningJobPublic,
    HyperparametersPublic,
    HyperparametersSpec,
    IntegrationSpec,
    JobErrorPublic,
    MethodPublic,
    OpenAIJobStatus,
    SupervisedPublic,
)
from shared.config import TrainConfig, TrainingMethod
from shared.events import JobEvent, StatusChanged, StepMetrics, WarningNotice
from shared.jobs import JobRecord, JobStatus
from shared.stream_ids import StreamIdError, parse_stream_id

EVENT_ID_PREFIX = "ftevent-"

# Our statuses are a subset of OpenAI's (we validate files at upload, so never `validating_files`).
_STATUS: dict[JobStatus, OpenAIJobStatus] = {
    JobStatus.queued: "queued",
    JobStatus.running: "running",
    JobStatus.pausing: "pausing",
    JobStatus.paused: "paused",
    JobStatus.succeeded: "succeeded",
    JobStatus.failed: "failed",
    JobStatus.cancelled: "cancelled",
}
# Where a TrainConfig field came from in the request, to name it in errors.
_PARAMS = {
    "model_name": "model",
    "epochs": "hyperparameters.n_epochs",
    "batch_size": "hyperparameters.batch_size",
    "learning_rate": "hyperparameters.learning_rate_multiplier",
    "seed": "seed",
    "model_save_path": "suffix",
    "dpo_beta": "method.dpo.hyperparameters.beta",
}


# --------------------------------------------------------------------------- requests in


@dataclass(frozen=True)
class MethodChoice:
    """What `method` (or the deprecated top-level `hyperparameters`) asks to train."""

    type: Literal["supervised", "dpo"]
    spec: HyperparametersSpec
    beta: float | None = None  # dpo only, "auto" resolved

    @property
    def config_method(self) -> TrainingMethod:
        return "dpo" if self.type == "dpo" else "sft"


def method_choice(body: FineTuningJobCreate) -> MethodChoice:
    """The method and its hyperparameters: from `method.<type>` (preferred) or the deprecated top-level field."""
    top, method = body.hyperparameters, body.method
    if method is None:
        return MethodChoice("supervised", top or HyperparametersSpec())
    if method.type == "reinforcement":
        msg = "reinforcement fine-tuning is not supported; use supervised or dpo"
        raise UnsupportedOption(msg, problems=[field_error(["method.type"], msg)])
    other = "supervised" if method.type == "dpo" else "dpo"
    if getattr(method, other) is not None:
        msg = f"method.{other} is given but method.type is {method.type!r}"
        raise InvalidInput(msg, problems=[field_error([f"method.{other}"], f"method.type is {method.type!r}")])
    block = method.dpo if method.type == "dpo" else method.supervised
    nested = block.hyperparameters if block is not None else None
    if nested is not None and top is not None and _common(top) != _common(nested):
        msg = f"hyperparameters differ between the top level and method.{method.type}; send them under method only"
        raise InvalidInput(msg, problems=[field_error(["hyperparameters"], f"differs from method.{method.type}")])
    spec = nested or top or HyperparametersSpec()
    if method.type == "supervised":
        return MethodChoice("supervised", spec)
    dpo = spec if isinstance(spec, DpoHyperparametersSpec) else DpoHyperparametersSpec(**_common(spec))
    return MethodChoice("dpo", dpo, dpo.dpo_beta)


def _common(spec: HyperparametersSpec) -> dict[str, Any]:
    """The hyperparameters every method shares (DPO's beta aside)."""
    return {name: getattr(spec, name) for name in HyperparametersSpec.model_fields}


def resolved(spec: HyperparametersSpec) -> HyperparametersPublic:
    return HyperparametersPublic(n_epochs=spec.epochs, batch_size=spec.batch, learning_rate_multiplier=spec.multiplier)


def _save_path(suffix: str | None, job_id: str) -> str | None:
    if suffix is None:
        return None
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", suffix).strip(".-") or "model"
    return f"ft-{slug}-{job_id.removeprefix('job-')[:8]}"


def train_config(body: FineTuningJobCreate, choice: MethodChoice, job_id: str) -> TrainConfig:
    """Our training config for the request; InvalidInput naming the request's own field otherwise."""
    spec = choice.spec
    fields: dict[str, object] = {
        "method": choice.config_method,
        "model_name": body.model,
        "epochs": spec.epochs,
        "batch_size": spec.batch,
        "learning_rate": BASE_LEARNING_RATE * spec.multiplier,
        "model_save_path": _save_path(body.suffix, job_id),
    }
    if body.seed is not None:
        fields["seed"] = body.seed
    if choice.beta is not None:
        fields["dpo_beta"] = choice.beta
    try:
        return TrainConfig.model_validate(fields)
    except ValidationError as exc:
        err = exc.errors(include_url=False, include_input=False)[0]
        name = str(err["loc"][0]) if err["loc"] else ""
        param = _PARAMS.get(name, name)
        problems = [field_error([param], err["msg"])] if param else []
        raise InvalidInput(f"{param or 'body'}: {err['msg']}", problems=problems) from exc


def stream_cursor(after: str | None) -> str | None:
    """Our stream id from an event id this API returned (`after` of the events list)."""
    if after is None:
        return None
    try:
        return parse_stream_id(after.removeprefix(EVENT_ID_PREFIX))
    except StreamIdError as exc:
        msg = f"{after[:80]!r} is not an event id this API returned ({exc})"
        raise MalformedRequest(f"after: {msg}", problems=[field_error(["after"], msg)]) from exc


# --------------------------------------------------------------------------- objects out


def file_public(record: FileRecord) -> FilePublic:
    return FilePublic(
        id=record.id, bytes=record.bytes, created_at=record.created_at, filename=record.filename, purpose=record.purpose
    )


# A failed job's error, as OpenAI's `error {code, message, param}`: what the message starts with or
# holds says which kind of failure it was (the worker records `ExceptionType: message`).
_ERROR_CODES: list[tuple[str, str, str | None]] = [
    ("worker lost", "worker_lost", None),
    ("no worker picked up", "queue_timeout", None),
    ("could not enqueue", "broker_unavailable", None),
    ("could not requeue", "broker_unavailable", None),
    ("OutOfMemoryError", "out_of_memory", "hyperparameters.batch_size"),
    ("no example has an assistant token", "invalid_training_file", "training_file"),
    ("dataset record", "invalid_training_file", "training_file"),
    ("DestinationInUse", "output_in_use", "suffix"),
    ("OSError", "model_not_found", "model"),
]


def job_error(message: str) -> JobErrorPublic:
    for needle, code, param in _ERROR_CODES:
        if needle in message:
            return JobErrorPublic(code=code, message=message, param=param)
    return JobErrorPublic(code="training_failed", message=message)


def name_parts(record: JobRecord, extra: OpenAIJobRecord | None) -> tuple[str, str | None]:
    """The base and suffix a job's `ft:` names are built from: the base's one name (api.base_models' canonical
    name, recorded at submission: two spellings of one base give one name), a /v1 job's suffix as sent."""
    return (record.base_model or requested_model(record, extra), extra.suffix if extra else None)


def requested_model(record: JobRecord, extra: OpenAIJobRecord | None) -> str:
    """The base model as the client named it (a job's `model`)."""
    return extra.model if extra else record.config.model_name


def job_public(
    record: JobRecord,
    extra: OpenAIJobRecord | None,
    result_files: list[str] | None = None,
    *,
    queue_position: int | None = None,
) -> FineTuningJobPublic:
    """OpenAI's view of any of our jobs; `extra` holds what a job created through /v1 was sent with."""
    params = extra.hyperparameters if extra else _hyperparameters_of(record.config)
    model, suffix = name_parts(record, extra)
    succeeded = record.status is JobStatus.succeeded
    eta = record.progress.eta_seconds if record.status in (JobStatus.running, JobStatus.pausing) else None
    error = job_error(record.error or record.message or "failed") if record.status is JobStatus.failed else None
    return FineTuningJobPublic(
        id=record.id,
        created_at=int(record.created_at),
        finished_at=int(record.finished_at) if record.finished_at is not None else None,
        model=requested_model(record, extra),
        fine_tuned_model=fine_tuned_model_name(model, suffix, record.id) if succeeded else None,
        result_files=result_files or [],
        status=_STATUS[record.status],
        # A job submitted through POST /train has no file id: name its stored dataset instead.
        training_file=extra.training_file if extra else Path(record.dataset_path).name,
        validation_file=extra.validation_file if extra else None,
        hyperparameters=params,
        trained_tokens=record.metrics.total_tokens if succeeded and record.metrics else None,
        error=error,
        seed=record.config.seed,
        estimated_finish=int(time.time() + eta) if eta is not None else None,
        integrations=[IntegrationSpec(type="wandb", wandb=record.wandb)] if record.wandb else [],
        metadata=extra.metadata if extra else None,
        user_provided_suffix=suffix,
        queue_position=queue_position,
        method=_method_public(record.config, params),
    )


def _method_public(config: TrainConfig, params: HyperparametersPublic) -> MethodPublic:
    """The job's `method`, as its config says (however the job was submitted)."""
    if config.method == "dpo":
        dpo = DpoHyperparametersPublic(**params.model_dump(), beta=config.dpo_beta)
        return MethodPublic(type="dpo", dpo=DpoPublic(hyperparameters=dpo))
    return MethodPublic(type="supervised", supervised=SupervisedPublic(hyperparameters=params))


def _hyperparameters_of(config: TrainConfig) -> HyperparametersPublic:
    return HyperparametersPublic(
        n_epochs=config.epochs,
        batch_size=config.batch_size,
        learning_rate_multiplier=float(f"{config.learning_rate / BASE_LEARNING_RATE:.6g}"),
    )


def event_public(event: JobEvent) -> FineTuningJobEventPublic:
    """A `metrics` event under OpenAI's names (`step`, `train_loss`); any other event as a message."""
    level: Literal["info", "warn", "error"] = "info"
    if isinstance(event.data, WarningNotice):
        level = "warn"
    elif isinstance(event.data, StatusChanged) and event.data.status is JobStatus.failed:
        level = "error"
    common: dict[str, Any] = {"id": EVENT_ID_PREFIX + event.id, "created_at": int(event.created_at)}
    if isinstance(event.data, StepMetrics):
        m = event.data
        figures = {"step": m.step, "train_loss": m.loss, "train_mean_token_accuracy": m.accuracy,
                   "valid_loss": m.valid_loss, "valid_mean_token_accuracy": m.valid_accuracy, "epoch": m.epoch,
                   "learning_rate": m.learning_rate, "grad_norm": m.grad_norm,
                   "tokens_per_second": m.tokens_per_second, "step_seconds": m.step_seconds,
                   "reward_margin": m.reward_margin, "reward_accuracy": m.reward_accuracy}  # fmt: skip
        data = {k: v for k, v in figures.items() if v is not None}
        return FineTuningJobEventPublic(**common, level=level, message=event.message, type="metrics", data=data)
    details = {"event": event.type, **event.data.model_dump(mode="json")}
    return FineTuningJobEventPublic(**common, level=level, message=event.message, type="message", data=details)


def checkpoint_id(job_id: str, step: int) -> str:
    return f"ftckpt-{job_id}-step-{step:06d}"


def checkpoint_public(
    record: JobRecord, extra: OpenAIJobRecord | None, checkpoint: Checkpoint
) -> FineTuningJobCheckpointPublic:
    """A checkpoint, named as OpenAI names one (`ft:{model}:{suffix}:{job id}:ckpt-step-{step}`); its
    folder is in `/jobs/{id}/checkpoints`."""
    model, suffix = name_parts(record, extra)
    return FineTuningJobCheckpointPublic(
        id=checkpoint_id(record.id, checkpoint.step),
        created_at=int(checkpoint.created_at),
        fine_tuned_model_checkpoint=checkpoint_model_name(model, suffix, record.id, checkpoint.step),
        fine_tuning_job_id=record.id,
        # The checkpoint's figures already carry OpenAI's metric names.
        metrics=CheckpointMetricsPublic.model_validate(checkpoint, from_attributes=True),
        step_number=checkpoint.step,
    )
