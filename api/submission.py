"""Turning a validated config and an uploaded dataset into an admitted, enqueued job."""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Literal

import redis
from celery import Celery
from pydantic import ValidationError

from api.errors import ApiError
from api.uploads import disk_full, storage_error
from shared.config import TrainConfig
from shared.dataset import DatasetError, DatasetSummary, reject_json_constant, validate_dataset
from shared.jobs import JobRecord, JobStatus
from shared.paths import UnsafePathError, resolve_inside
from shared.reaper import publish_train
from shared.settings import Settings
from shared.store import JobStore

log = logging.getLogger(__name__)


def new_job_id() -> str:
    return f"job-{uuid.uuid4().hex[:20]}"


def parse_config(text: str | None) -> TrainConfig:
    """The `config` part as a TrainConfig; a precise 422 naming each bad field otherwise."""
    if text is None or not text.strip():
        return TrainConfig()
    try:
        raw: Any = json.loads(text, parse_constant=reject_json_constant)
    except RecursionError as exc:
        raise _too_deep() from exc
    except ValueError as exc:
        raise ApiError(422, f"config is not valid JSON: {exc}", [{"loc": ["config"], "msg": str(exc)}]) from exc
    if not isinstance(raw, dict):
        raise ApiError(422, "config must be a JSON object", [{"loc": ["config"], "msg": "expected an object"}])
    try:  # a lone surrogate escape ("\\ud800") decodes fine but can be neither stored nor echoed back
        json.dumps(raw, ensure_ascii=False).encode("utf-8")
    except RecursionError as exc:
        raise _too_deep() from exc
    except UnicodeEncodeError as exc:
        msg = "contains a lone surrogate escape (\\ud800-\\udfff), which is not valid Unicode"
        raise ApiError(422, f"config {msg}", [{"loc": ["config"], "msg": msg}]) from exc
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        errors = [
            {"loc": ["config", *[str(p) for p in err["loc"]]], "msg": err["msg"], "type": err["type"]}
            for err in exc.errors(include_url=False, include_input=False)
        ]
        summary = "; ".join(f"{'.'.join(e['loc'][1:]) or 'config'}: {e['msg']}" for e in errors)
        raise ApiError(422, f"invalid config: {summary}", errors) from exc


def _too_deep() -> ApiError:
    return ApiError(422, "config is nested too deeply", [{"loc": ["config"], "msg": "nested too deeply"}])


def resolve_output(settings: Settings, user_path: str, field: str, loc: str = "config") -> Path:
    """An output folder the worker may replace: inside base_path and not one of the service's own."""
    base = settings.base_path
    try:
        output = resolve_inside(base, user_path)
    except UnsafePathError as exc:
        raise _path_error(field, str(exc), loc) from exc
    reserved = _reserved_part(output, base)
    if reserved is not None:
        msg = f"{reserved!r} is reserved for the service's own files ({_RESERVED_HELP})"
        raise _path_error(field, msg, loc)
    return output


def resolve_paths(config: TrainConfig, settings: Settings, job_id: str) -> tuple[Path, Path | None]:
    """The job's output folder and its starting adapter, both required to stay inside base_path."""
    base = settings.base_path
    output = resolve_output(settings, config.model_save_path or job_id, "model_save_path")
    lora: Path | None = None
    if config.lora_path is not None:
        try:
            lora = resolve_inside(base, config.lora_path)
        except UnsafePathError as exc:
            raise _path_error("lora_path", str(exc)) from exc
        if not (lora / "adapter_config.json").is_file():
            raise _path_error("lora_path", f"no adapter (adapter_config.json) at {config.lora_path!r} under base_path")
    return output, lora


# Top-level folders the service writes itself; an adapter saved over one would replace (and delete) it.
RESERVED_DIRS = frozenset({"datasets", "checkpoints"})
_RESERVED_HELP = "datasets/, checkpoints/ and names starting with '.', such as the embedded Redis's .redis/"


def _reserved_part(output: Path, base: Path) -> str | None:
    """The part of `output` (resolved, inside base) that is the service's own, if any."""
    parts = output.relative_to(base.resolve()).parts
    if parts[0] in RESERVED_DIRS:
        return parts[0]
    # Hidden names: the embedded Redis's data folder and the worker's `.name.*.tmp` staging folders.
    return next((part for part in parts if part.startswith(".")), None)


def _path_error(field: str, msg: str, loc: str = "config") -> ApiError:
    return ApiError(422, f"{field}: {msg}", [{"loc": [loc, field], "msg": msg}])


def store_dataset(upload: Path, settings: Settings, name: str, *, part: str = "file") -> tuple[Path, DatasetSummary]:
    """Validate the spooled upload and move its normalised form into the datasets folder.

    422 for a bad dataset, 507 when the volume fills up, 500 for any other storage failure;
    in every case nothing is left in the datasets folder.
    """
    staging = settings.incoming_dir / f"{name}.jsonl.part"
    final = settings.datasets_dir / f"{name}.jsonl"
    try:
        settings.incoming_dir.mkdir(parents=True, exist_ok=True)
        summary = validate_dataset(
            upload, staging, max_record_bytes=settings.max_record_kb * 1024, max_records=settings.max_records
        )
        os.replace(staging, final)
    except DatasetError as exc:
        errors = [{"loc": [part, p.where], "msg": p.reason} for p in exc.problems]
        detail = str(exc) if part == "file" else f"{part}: {exc}"
        raise ApiError(422, detail, errors, truncated=exc.truncated) from exc
    except OSError as exc:
        staging.unlink(missing_ok=True)
        raise storage_error(exc, "dataset") from exc
    return final, summary


def check_disk(settings: Settings) -> None:
    settings.base_path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(settings.base_path).free
    if free < settings.min_free_disk_mb * 1024 * 1024:
        raise disk_full("upload (LORA_MIN_FREE_DISK_MB)")


def admit(
    store: JobStore,
    celery: Celery,
    settings: Settings,
    *,
    job_id: str,
    config: TrainConfig,
    dataset: Path | str,
    num_records: int,
    output_dir: Path,
    validation: Path | None = None,
    kind: Literal["train", "merge"] = "train",
    source_job: str | None = None,
) -> JobRecord:
    """Take a slot and enqueue; 409 when every slot is taken, 503 when the task cannot be published."""
    record = JobRecord(
        id=job_id,
        status=JobStatus.queued,
        created_at=0.0,
        config=config,
        kind=kind,
        dataset_path=str(dataset),
        validation_path=str(validation) if validation else None,
        source_job=source_job,
        num_records=num_records,
        output_dir=str(output_dir),
        message="Queued, waiting for a worker",
        max_attempts=settings.max_attempts,
    )
    result = store.admit(record, max_slots=settings.max_concurrent_jobs, queue_timeout_s=settings.queue_timeout_s)
    if not result.admitted:
        raise busy(result.running)
    try:
        publish_train(celery, job_id)
    except Exception as exc:
        log.error("could not publish job %s: %s", job_id, exc)
        store.abort(job_id, f"could not enqueue the job: {exc}")
        raise ApiError(503, f"the broker did not accept the job: {exc}") from exc
    try:  # the job is queued now: a failed read-back must not make the caller undo it
        stored = store.get(job_id)
    except redis.RedisError:
        stored = None
    return stored if stored is not None else record


def ensure_free_slot(store: JobStore, settings: Settings) -> None:
    """409 before reading a possibly large body when every slot is already taken (admission re-checks atomically)."""
    running = store.active_ids()
    if len(running) >= settings.max_concurrent_jobs:
        raise busy(running)


def busy(running: list[str]) -> ApiError:
    names = ", ".join(running)
    return ApiError(
        409, f"Training already in progress (job {names}); every training slot is taken", running_jobs=running
    )
