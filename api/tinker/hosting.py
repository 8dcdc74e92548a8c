"""Which job hosts a Tinker training model, and what the API does about it.

A model is hosted by a job of kind "tinker" admitted like any training job (the same slots, the same waiting
line). A host that went idle saves the model's state into `model.load_from` and ends its job (succeeded): the
next call starts a new hosting job (`rehost_if_idle`). A host that was lost (its job failed or was cancelled)
takes its model's queued calls with it: their futures are failed saying where the last saved state is
(`settle_if_host_lost`), and the model takes no more calls.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from celery import Celery

from api.errors import BrokerUnavailable, QueueFull, SlotsBusy
from api.submission import admit_job
from api.tinker.bases import accepted_base
from api.tinker.errors import TinkerRefusal, busy, unavailable
from shared import keys
from shared import tinker_store as ts
from shared.config import TrainConfig
from shared.job_ids import new_job_id
from shared.jobs import JobRecord, JobStatus
from shared.settings import Settings
from shared.store import JobStore

log = logging.getLogger(__name__)
HOST_LOCK_S = 30  # a request starting a host holds the model's lock at most this long
CALL_NAMES = {
    "forward": "forward",
    "forward_backward": "forward_backward",
    "optim_step": "optim_step",
    "save_weights": "save_weights",
    "save_weights_for_sampler": "save_weights_for_sampler",
    "load_weights": "load_weights",
    "unload": "unload",
}


def ensure_hosted(store: JobStore, celery: Celery, settings: Settings, model: ts.TinkerModel, call: str) -> JobRecord:
    """Start a hosting job for `model` (admitted like a training job: a slot, or the waiting line) and record it
    on the model. 429 when the waiting line is full, 503 when the broker refuses the task."""
    base = accepted_base(settings, model.base_model, call)
    job_id = new_job_id()
    config = TrainConfig(model_name=model.base_model, lora_rank=model.rank, lora_dropout=0.0, seed=model.seed)
    record = JobRecord(
        id=job_id,
        kind="tinker",
        status=JobStatus.queued,
        created_at=0.0,
        config=config,
        dataset_path="",
        model_dir=base.location,
        base_model=base.canonical,
        output_dir=str(settings.volume.tinker_model(model.model_id)),
        message=f"Hosting Tinker model {model.model_id}",
        max_attempts=1,
    )
    previous = model.job_id
    ts.set_job_model(store.client, job_id, model.model_id)
    model.job_id = job_id
    ts.save_model(store.client, model)  # before admission: the host reads the model as soon as it starts
    try:
        return admit_job(store, celery, settings, record, wait=True)
    except (QueueFull, SlotsBusy) as exc:
        _undo(store, model, previous, job_id)
        raise busy(call, f"no training slot for model {model.model_id}: {exc}", retry_after_s=10) from exc
    except BrokerUnavailable as exc:
        _undo(store, model, previous, job_id)
        raise unavailable(call, exc.message) from exc


def _undo(store: JobStore, model: ts.TinkerModel, previous: str | None, job_id: str) -> None:
    model.job_id = previous
    ts.save_model(store.client, model)
    store.client.delete(keys.tinker_job_model_key(job_id))


def rehost_if_idle(store: JobStore, celery: Celery, settings: Settings, model_id: str, call: str) -> None:
    """Start a new hosting job for a model whose host went idle (its job succeeded) while calls wait for it.
    One request does it: the others find the lock taken, or the model already hosted again."""
    model = ts.get_model(store.client, model_id)
    if model is None or model.closed or model.job_id is None:
        return
    job = store.get(model.job_id)
    if job is None or job.status is not JobStatus.succeeded:
        return
    lock = keys.tinker_host_lock_key(model_id)
    if not store.client.set(lock, model.job_id, nx=True, ex=HOST_LOCK_S):
        return
    try:
        model = ts.get_model(store.client, model_id)
        if model is None or model.job_id != job.id:  # someone hosted it again meanwhile
            return
        log.info("model %s: its host went idle; starting a new hosting job", model_id)
        ensure_hosted(store, celery, settings, model, call)
    finally:
        store.client.delete(lock)


def last_state(store: JobStore, model_id: str) -> str:
    saved = [c for c in ts.checkpoints(store.client, model_id) if c.checkpoint_type == "training"]
    if not saved:
        return "no state of it was saved (save_state saves one)"
    return f"the model's last saved state is {saved[-1].tinker_path}: create a training client from it"


def lost_message(store: JobStore, model: ts.TinkerModel, job: JobRecord, call: str) -> str:
    reason = job.error or job.message or job.status.value
    return (
        f"{call} was not run: the worker hosting model {model.model_id} was lost ({reason}); "
        f"{last_state(store, model.model_id)}"
    )


def lost_host(store: JobStore, model: ts.TinkerModel) -> JobRecord | None:
    """The model's hosting job when it ended failed or cancelled (its host is gone, and its state with it)."""
    if model.job_id is None:
        return None
    job = store.get(model.job_id)
    if job is None or job.status not in (JobStatus.failed, JobStatus.cancelled):
        return None
    return job


def fail_queued_calls(store: JobStore, model: ts.TinkerModel, job: JobRecord) -> None:
    for queued in ts.drop_calls(store.client, model.model_id):
        ts.fail(store.client, queued.request_id, lost_message(store, model, job, CALL_NAMES[queued.op.op]), "server")
    if model.create_request_id is not None:
        created = ts.get_future(store.client, model.create_request_id)
        if created is not None and created.state == "pending":
            ts.fail(store.client, model.create_request_id, lost_message(store, model, job, "create_model"), "server")


def refuse_if_lost(store: JobStore, model: ts.TinkerModel, call: str) -> None:
    """A 400 for a call to a model whose host was lost (after failing what was still queued for it)."""
    job = lost_host(store, model)
    if job is not None:
        fail_queued_calls(store, model, job)
        raise TinkerRefusal(400, lost_message(store, model, job, call), "model_lost")


@dataclass(frozen=True)
class HostState:
    queue_state: Literal["active", "paused_capacity"]
    reason: str | None = None


def check_pending(
    store: JobStore, celery: Celery, settings: Settings, request_id: str, model_id: str, call: str
) -> HostState:
    """What a pending future of `model_id` waits on; fails it (and the model's queued calls) when its host was
    lost, and starts a new host when the last one went idle with calls still queued."""
    model = ts.get_model(store.client, model_id)
    if model is None or model.job_id is None:
        return HostState("active")
    job = store.get(model.job_id)
    if job is None:
        return HostState("active")
    if job.status in (JobStatus.failed, JobStatus.cancelled):
        fail_queued_calls(store, model, job)
        future = ts.get_future(store.client, request_id)
        if future is not None and future.state == "pending":
            ts.fail(store.client, request_id, lost_message(store, model, job, call), "server")
        return HostState("active")
    if job.status is JobStatus.succeeded:
        if ts.pending_calls(store.client, model_id):
            try:
                rehost_if_idle(store, celery, settings, model_id, call)
            except TinkerRefusal as exc:  # no room now: the next poll tries again
                return HostState("paused_capacity", exc.detail)
            return HostState("active", "starting a worker to host the model again")
        future = ts.get_future(store.client, request_id)  # read after the job: a host settles before it ends
        if future is not None and future.state == "pending":
            ts.fail(store.client, request_id, f"{call} was not run: the host of model {model_id} ended without it; "
                    f"{last_state(store, model_id)}", "server")  # fmt: skip
        return HostState("active")
    position = store.queue_position(job.id)
    if position is not None:
        return HostState("paused_capacity", f"waiting for a training slot ({position - 1} jobs ahead)")
    if job.status is JobStatus.queued:
        return HostState("active", "waiting for a worker to load the model")
    return HostState("active")
