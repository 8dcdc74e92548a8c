"""Which job hosts a Tinker training model, and what the API does about it.

A model is hosted by a job of kind "tinker" (`JobRecord.tinker_model`: the model it was started for) admitted like
any training job (the same slots, the same waiting line). A running host on the same base with room
(shared.tinker_store.HostInfo) takes more clients: the API pushes the model id on its attach list instead of
starting a job. A client that went idle is saved into `model.load_from` and its `job_id` cleared: its next call
hosts it again (`rehost_if_idle`). A host that was lost (its job failed or was cancelled) takes its models' queued
calls with it: their futures are failed saying where the last saved state is (`check_pending`, `refuse_if_lost`), and the
model takes no more calls.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from celery import Celery

from api.errors import BrokerUnavailable, NoWorkers, QueueFull, SlotsBusy
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


def _join_running_host(store: JobStore, model: ts.TinkerModel, location: str) -> str | None:
    """Send the model to a running host on its base that has room (it attaches it); that host's job id."""
    for host in ts.hosts(store.client):
        if host.model_dir != location or not host.has_room:
            continue
        job = store.get(host.job_id)
        if job is None or job.status.terminal:
            continue
        model.job_id = host.job_id
        ts.save_model(store.client, model)  # before the push: the host reads the model when it attaches it
        store.client.rpush(keys.tinker_host_attach_key(host.job_id), model.model_id)
        return host.job_id
    return None


def ensure_hosted(store: JobStore, celery: Celery, settings: Settings, model: ts.TinkerModel, call: str) -> str:
    """Host `model`: on a running host of its base with room, else on a new hosting job (admitted like a training
    job: a slot, or the waiting line); recorded on the model. 429 when the waiting line is full, 503 when the
    broker refuses the task. Returns the hosting job's id."""
    base = accepted_base(settings, model.base_model, call)
    joined = _join_running_host(store, model, base.location)
    if joined is not None:
        return joined
    job_id = new_job_id()
    config = TrainConfig(model_name=model.base_model, lora_rank=model.rank, lora_dropout=0.0, seed=model.seed)
    record = JobRecord(
        id=job_id,
        kind="tinker",
        status=JobStatus.queued,
        created_at=0.0,
        config=config,
        dataset_path="",
        tinker_model=model.model_id,
        model_dir=base.location,
        base_model=base.canonical,
        output_dir=str(settings.volume.tinker_model(model.model_id)),
        volume_base=str(settings.base_path.resolve()),
        message=f"Hosting Tinker model {model.model_id}",
        max_attempts=1,
    )
    previous = model.job_id
    model.job_id = job_id
    ts.save_model(store.client, model)  # before admission: the host reads the model as soon as it starts
    try:
        admit_job(store, celery, settings, record, wait=True)
    except (QueueFull, SlotsBusy, NoWorkers) as exc:
        _undo(store, model, previous)
        raise busy(call, f"no training slot for model {model.model_id}: {exc}", retry_after_s=10) from exc
    except BrokerUnavailable as exc:
        _undo(store, model, previous)
        raise unavailable(call, exc.message) from exc
    return job_id


def _undo(store: JobStore, model: ts.TinkerModel, previous: str | None) -> None:
    model.job_id = previous
    ts.save_model(store.client, model)


def unhosted(store: JobStore, model: ts.TinkerModel) -> bool:
    """Whether no host has the model now: it left its host (idle, or the worker stopped: `job_id` cleared) or its
    hosting job ended succeeded. A lost host (failed, cancelled) is not "unhosted": its state went with it."""
    if model.job_id is None:
        return True
    job = store.get(model.job_id)
    return job is None or job.status is JobStatus.succeeded


def rehost_if_idle(store: JobStore, celery: Celery, settings: Settings, model_id: str, call: str) -> None:
    """Host again a model that left its host (idle) while calls wait for it. One request does it: the others find
    the lock taken, or the model hosted again."""
    model = ts.get_model(store.client, model_id)
    if model is None or model.closed or not unhosted(store, model):
        return
    lock = keys.tinker_host_lock_key(model_id)
    if not store.client.set(lock, "1", nx=True, ex=HOST_LOCK_S):
        return
    try:
        model = ts.get_model(store.client, model_id)
        if model is None or not unhosted(store, model):  # someone hosted it again meanwhile
            return
        log.info("model %s: no host has it; hosting it again", model_id)
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


def _host_again(store: JobStore, celery: Celery, settings: Settings, model_id: str, call: str) -> HostState:
    if not ts.pending_calls(store.client, model_id):
        return HostState("active")
    try:
        rehost_if_idle(store, celery, settings, model_id, call)
    except TinkerRefusal as exc:  # no room now: the next poll tries again
        return HostState("paused_capacity", exc.detail)
    return HostState("active", "hosting the model again")


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
    if model is None:
        return HostState("active")
    if model.job_id is None:
        return _host_again(store, celery, settings, model_id, call)
    job = store.get(model.job_id)
    if job is None:
        return _host_again(store, celery, settings, model_id, call)
    if job.status in (JobStatus.failed, JobStatus.cancelled):
        fail_queued_calls(store, model, job)
        future = ts.get_future(store.client, request_id)
        if future is not None and future.state == "pending":
            ts.fail(store.client, request_id, lost_message(store, model, job, call), "server")
        return HostState("active")
    if job.status is JobStatus.succeeded:
        if ts.pending_calls(store.client, model_id):
            return _host_again(store, celery, settings, model_id, call)
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
    if job.status is JobStatus.paused:
        return HostState("paused_capacity", "its hosting job is paused")
    return HostState("active")
