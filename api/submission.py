"""One way to submit a job: `submit_job` validates its paths, stores its data, admits it to a slot and
publishes its task, and undoes all of it on any failure. The base model goes through api.base_models' rule:
a name it refuses leaves nothing behind. `POST /train`, `POST /v1/fine_tuning/jobs`
and `POST /jobs/{id}/merge` all come through here.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import redis
from celery import Celery
from pydantic import ValidationError

from api.base_models import BaseModel, ModelRefused, check_base_model
from api.dataset_validation import reject_json_constant
from api.datasets import JobData
from api.errors import (
    BrokerUnavailable,
    InvalidInput,
    ModelNotAllowed,
    NoWorkers,
    ObjectStoreDown,
    OutputInUse,
    QueueFull,
    SlotsBusy,
    field_error,
)
from api.paths import UnsafePathError, model_location, resolve_inside
from shared import workers
from shared.admission import promote_waiting, publish_or_fail
from shared.config import TrainConfig
from shared.job_ids import new_job_id
from shared.jobs import JobRecord, JobStatus, WandbSpec
from shared.object_store import ObjectStore, StorageUnavailable
from shared.outputs import destination_problem, stored_destination_problem
from shared.settings import Settings
from shared.store import JobStore
from shared.volume import ADAPTER_CONFIG, RESERVED_HELP, merged_name

log = logging.getLogger(__name__)


class DataSource(Protocol):
    """Where a training job's datasets come from; `place` puts them under the job's own names."""

    def place(self, settings: Settings, job_id: str) -> JobData: ...


class Companion(Protocol):
    """A record kept beside the job (the OpenAI-only fields): attached before admission, so the job
    is never seen without it, and detached if the job is not created after all."""

    def attach(self, job_id: str) -> None: ...

    def detach(self, job_id: str) -> None: ...


@dataclass(frozen=True)
class JobRequest:
    """A job to submit: training on `data`, or (with `merge_of`) merging a finished job's adapter."""

    config: TrainConfig
    data: DataSource | None = None
    merge_of: JobRecord | None = None
    merge_adapter: str | None = None  # or merging an adapter folder under base_path (the seed's POST /merge)
    merge_output: str | None = None  # a merge's output folder under base_path (default: <adapter>-merged)
    wandb: WandbSpec | None = None  # the W&B run the job logs to, where the worker has W&B configured
    companion: Companion | None = None
    wait: bool = False  # join the waiting line when every slot is taken, instead of a 409
    model_field: tuple[str, ...] = ("config", "model_name")  # where the request named the base model
    job_id: str = field(default_factory=new_job_id)


def submit_job(store: JobStore, celery: Celery, settings: Settings, request: JobRequest) -> JobRecord:
    """Validate, store, admit, publish; on failure nothing of the job is left but, when its task could
    not be published, its record (failed)."""
    job_id, source = request.job_id, request.merge_of
    data: JobData | None = None
    adapter: Path | None = None
    lora: Path | None = None
    if source is not None:
        assert source.model_path is not None
        adapter = Path(source.model_path)
        output = _merge_output(settings, adapter, request.merge_output)
        # It folds into the base its job trained on (checked when that job was submitted).
        model_dir = source.model_dir or model_location(settings.base_path, source.config.model_name)
        base_name = source.base_model or source.config.model_name
    elif request.merge_adapter is not None:
        adapter = _adapter_path(settings, request.merge_adapter, "lora_path", loc="body")
        output = _merge_output(settings, adapter, request.merge_output, field="model_output")
        base = accepted_base_model(settings, request)
        model_dir, base_name = base.location, base.canonical
    else:
        assert request.data is not None
        output, lora = resolve_train_paths(request.config, settings, job_id)
        data = request.data.place(settings, job_id)
        try:  # after the dataset's own checks, so a bad dataset is named whatever the model: this may ask the hub
            base = accepted_base_model(settings, request)
        except BaseException:
            data.remove()
            raise
        model_dir, base_name = base.location, base.canonical
    record = JobRecord(
        id=job_id,
        kind="train" if adapter is None else "merge",
        status=JobStatus.queued,
        created_at=0.0,
        config=request.config,
        # A merge job's input is the adapter it folds in.
        dataset_path=str(data.dataset) if data is not None else str(adapter),
        validation_path=str(data.validation) if data is not None and data.validation else None,
        source_job=source.id if source is not None else None,
        model_dir=model_dir,
        base_model=base_name,
        adapter_dir=str(lora) if lora is not None else None,
        num_records=data.num_records if data is not None else 0,
        output_dir=str(output),
        volume_base=str(settings.base_path.resolve()),
        message="Queued, waiting for a worker",
        max_attempts=settings.max_attempts,
        wandb=request.wandb,
    )
    try:
        if data is not None:
            _push_data(settings, data)
        if request.companion is not None:
            request.companion.attach(job_id)
        admitted = _admit(store, celery, settings, record, wait=request.wait)
    except BaseException:
        if data is not None:
            _unpush_data(settings, data)
            data.remove()
        if request.companion is not None:
            with contextlib.suppress(redis.RedisError):
                if store.get(job_id) is None:
                    request.companion.detach(job_id)
        raise
    return admitted


def accepted_base_model(settings: Settings, request: JobRequest) -> BaseModel:
    """The request's base model (what the worker loads, its one name); ModelNotAllowed naming the rule it breaks."""
    try:
        return check_base_model(settings, request.config.model_name)
    except ModelRefused as exc:
        name = request.model_field[-1]
        problem = field_error(list(request.model_field), str(exc), type="model_not_allowed")
        raise ModelNotAllowed(f"{name}: {exc}", problems=[problem]) from exc


def admit_job(store: JobStore, celery: Celery, settings: Settings, record: JobRecord, *, wait: bool) -> JobRecord:
    """Admit an already-built record under the one rule every job follows (a Tinker model's hosting job, say)."""
    return _admit(store, celery, settings, record, wait=wait)


def _admit(store: JobStore, celery: Celery, settings: Settings, record: JobRecord, *, wait: bool) -> JobRecord:
    """Take a slot and enqueue (or, with `wait`, join the waiting line): SlotsBusy / QueueFull when
    refused, BrokerUnavailable when the task cannot be published (the job is then recorded as failed)."""
    slots = workers.capacity(store.client, settings)
    result = store.admit(
        record,
        max_slots=slots,
        queue_timeout_s=settings.queue_timeout_s,
        max_waiting=settings.max_queued_jobs if wait else 0,
    )
    if result.line_full or (wait and not result.accepted):
        raise QueueFull(settings.max_queued_jobs)
    if not result.accepted:
        raise NoWorkers(workers.fresh_s(settings)) if slots == 0 else SlotsBusy(result.running)
    if not result.admitted:  # waiting: a slot may have freed meanwhile (promotion is atomic, never twice)
        promote_waiting(store, celery, settings)
        return store.get(record.id) or record
    refused = publish_or_fail(store, celery, record.id)
    if refused is not None:
        raise BrokerUnavailable(f"the broker did not accept the job: {refused}") from refused
    try:  # the job is queued now: a failed read-back must not make the caller undo it
        stored = store.get(record.id)
    except redis.RedisError:
        stored = None
    return stored if stored is not None else record


def ensure_room(store: JobStore, settings: Settings, *, wait: bool) -> None:
    """SlotsBusy (or with `wait`, QueueFull) before reading a possibly large body when the job could not
    be taken anyway (admission re-checks atomically)."""
    slots = workers.capacity(store.client, settings)
    if wait:
        if store.waiting_count() >= settings.max_queued_jobs and (
            settings.max_queued_jobs > 0 or len(store.active_ids()) >= slots
        ):
            raise QueueFull(settings.max_queued_jobs)
        return
    if slots == 0:
        raise NoWorkers(workers.fresh_s(settings))
    running = store.active_ids()
    if len(running) >= slots or store.waiting_count():
        raise SlotsBusy(running)


# --- validation --------------------------------------------------------------------------------------


def parse_config(text: str | None) -> TrainConfig:
    """The `config` part of `POST /train` as a TrainConfig; InvalidInput naming each bad field otherwise."""
    if text is None or not text.strip():
        return TrainConfig()
    try:
        raw: Any = json.loads(text, parse_constant=reject_json_constant)
    except RecursionError as exc:
        raise _config_error("config is nested too deeply", "nested too deeply") from exc
    except ValueError as exc:
        raise _config_error(f"config is not valid JSON: {exc}", str(exc)) from exc
    if not isinstance(raw, dict):
        raise _config_error("config must be a JSON object", "expected an object")
    try:  # a lone surrogate escape ("\\ud800") decodes fine but can be neither stored nor echoed back
        json.dumps(raw, ensure_ascii=False).encode("utf-8")
    except RecursionError as exc:
        raise _config_error("config is nested too deeply", "nested too deeply") from exc
    except UnicodeEncodeError as exc:
        msg = "contains a lone surrogate escape (\\ud800-\\udfff), which is not valid Unicode"
        raise _config_error(f"config {msg}", msg) from exc
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        errors = [
            field_error(["config", *[str(p) for p in err["loc"]]], err["msg"], type=err["type"])
            for err in exc.errors(include_url=False, include_input=False)
        ]
        summary = "; ".join(f"{'.'.join(e['loc'][1:]) or 'config'}: {e['msg']}" for e in errors)
        raise InvalidInput(f"invalid config: {summary}", problems=errors) from exc


def _config_error(message: str, msg: str) -> InvalidInput:
    return InvalidInput(message, problems=[field_error(["config"], msg)])


def resolve_output(
    settings: Settings, user_path: str, field: str, loc: str = "config", *, check_owner: bool = True
) -> Path:
    """An output folder the worker may replace: inside base_path, not one of the service's own, and
    (unless `check_owner` is off, for the caller to check after its own rules) empty or ours."""
    try:
        output = resolve_inside(settings.base_path, user_path)
    except UnsafePathError as exc:
        raise _path_error(field, str(exc), loc) from exc
    reserved = settings.volume.reserved_part(output)
    if reserved is not None:
        raise _path_error(field, f"{reserved!r} is reserved for the service's own files ({RESERVED_HELP})", loc)
    if check_owner:
        check_output_owner(output, user_path, field, loc, store=settings.store)
    return output


def _push_data(settings: Settings, data: JobData) -> None:
    """With object storage: the job's datasets go to the store, where its worker finds them (ObjectStoreDown
    when it cannot take them)."""
    store = settings.store
    if store is None:
        return
    try:
        for path in (data.dataset, data.validation):
            if path is not None:
                store.push_file(path)
    except StorageUnavailable as exc:
        raise ObjectStoreDown(str(exc)) from exc


def _unpush_data(settings: Settings, data: JobData) -> None:
    """A job refused after its datasets went to the store: they go from it too (best effort: a store that is
    down keeps them, under the refused job's id that nothing reads)."""
    store = settings.store
    if store is not None:
        with contextlib.suppress(StorageUnavailable):
            store.delete_keys([store.key(p) for p in (data.dataset, data.validation) if p is not None])


def check_output_owner(output: Path, user_path: str, field: str, loc: str, *, store: ObjectStore | None = None) -> None:
    """OutputInUse unless `output` is absent, empty or an earlier output of this service, on the volume and (with
    object storage) in the store: the same rule for keys (the worker checks again when it writes: nothing
    of the user's is ever replaced)."""
    problem = destination_problem(output)
    if problem is None and store is not None:
        try:
            problem = stored_destination_problem(store, output)
        except StorageUnavailable as exc:
            raise ObjectStoreDown(str(exc)) from exc
    if problem is not None:
        raise OutputInUse(field, user_path, problem, loc)


def resolve_train_paths(config: TrainConfig, settings: Settings, job_id: str) -> tuple[Path, Path | None]:
    """A training job's output folder and the adapter it continues (if any), both checked."""
    output = resolve_output(
        settings, config.model_save_path or settings.volume.default_output(job_id), "model_save_path"
    )
    lora = _adapter_path(settings, config.lora_path, "lora_path") if config.lora_path is not None else None
    return output, lora


def _adapter_path(settings: Settings, user_path: str, field: str, loc: str = "config") -> Path:
    """An adapter folder under base_path (it must hold an adapter_config.json)."""
    try:
        adapter = resolve_inside(settings.base_path, user_path)
    except UnsafePathError as exc:
        raise _path_error(field, str(exc), loc) from exc
    if (adapter / ADAPTER_CONFIG).is_file():
        return adapter
    store = settings.store
    if store is not None and ADAPTER_CONFIG in store.listed_folder(adapter):  # in the store: the worker stages it
        return adapter
    raise _path_error(field, f"no adapter ({ADAPTER_CONFIG}) at {user_path!r} under base_path", loc)


def _merge_output(settings: Settings, adapter: Path, output_path: str | None, field: str = "output_path") -> Path:
    user_path = output_path or merged_name(str(adapter))
    output = resolve_output(settings, user_path, field, loc="body", check_owner=False)
    adapter = adapter.resolve()
    if output == adapter or adapter.is_relative_to(output):
        raise _path_error(field, "would replace the adapter being merged", "body")
    check_output_owner(output, user_path, field, "body", store=settings.store)
    return output


def _path_error(field: str, msg: str, loc: str = "config") -> InvalidInput:
    return InvalidInput(f"{field}: {msg}", problems=[field_error([loc, field], msg)])
