"""Running one job inside a worker child: claim it, work under a lease, record the outcome."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path

import redis

from shared.admission import promote_waiting
from shared.config import TrainConfig
from shared.events import InfoNotice
from shared.jobs import JobRecord, JobStatus, Progress
from shared.metrics import TrainingSummary
from shared.object_store import StorageUnavailable
from shared.outputs import adapter_summary, is_jobs_adapter
from shared.settings import Settings, get_settings
from shared.store import JobStore, connect
from worker.jobs import staging
from worker.jobs.lease import LeaseKeeper
from worker.jobs.results import register_results
from worker.jobs.staging import JobFiles

log = logging.getLogger(__name__)

_LOSSES_KEPT = 1000  # logged losses kept in the job record, which every /jobs read parses


def worker_name(*, parent: bool = False) -> str:
    """What a job records as the worker that ran it: the worker's main process (this pool child's parent; with
    `parent`, called in that main process itself)."""
    main_pid = os.getpid() if parent else os.getppid()
    return get_settings().worker_name or f"{socket.gethostname()}:{main_pid}"


@dataclass
class Outcome:
    status: JobStatus  # `queued`: handed back to the queue, first in line (see `LeaseKeeper.handing_back`)
    message: str
    error: str | None = None
    model_path: str | None = None
    metrics: TrainingSummary | None = None
    count_attempt: bool = True  # a hand-back on a worker's stop gives the attempt back


def _train(record: JobRecord, settings: Settings, lease: LeaseKeeper) -> Outcome:
    from worker.jobs import child
    from worker.training import RunPaths, train_model  # torch loads in the child only, under the lease

    files = JobFiles.of(record, settings)
    staging.stage_training(files, settings, record.id)
    result = train_model(
        _run_config(record, files),
        files.dataset,
        validation=files.validation,
        paths=RunPaths.of_job(settings.volume, record.id, files.output, state_every_s=settings.state_every_s,
                              state_every=settings.state_every_steps, publish=staging.publisher(settings, record.id)),
        control=lease,
        wandb=record.wandb,
        resident=child.resident(),  # the previous job's base, when it is the same load
    )  # fmt: skip
    metrics = result.summary()
    metrics.losses = metrics.losses[-_LOSSES_KEPT:]  # the full curve is in training_summary.json
    if not result.stopped:
        staging.push_output(settings, files.output)  # complete in the store before it is recorded
        # Recorded under the API's name for it (the record's), which each host finds under its own base path.
        metrics.output_dir = record.output_dir
        return Outcome(JobStatus.succeeded, "Training completed", model_path=record.output_dir, metrics=metrics)
    if lease.cancelled.is_set():
        message = f"Training cancelled at step {result.steps}/{result.total_steps}"
        return Outcome(JobStatus.cancelled, message, error="cancelled by request", metrics=metrics)
    if lease.handing_back:
        where = f"step {result.steps}/{result.total_steps}" if result.total_steps else "its start"
        saved = "continues from its state saved there" if result.paused else "starts again"
        if lease.shutdown.is_set():
            why = f"worker {worker_name()} is stopping"
        else:
            why = f"worker {worker_name()} lost contact with Redis"
        return Outcome(JobStatus.queued, f"{why}: handed back at {where}; it {saved} on the next free slot",
                       count_attempt=not lease.shutdown.is_set())  # fmt: skip
    if result.paused:
        return Outcome(JobStatus.paused, f"Paused at step {result.steps}/{result.total_steps}; resume continues there")
    error = "lost contact with Redis (or the lease thread failed); stopped training"
    return Outcome(JobStatus.failed, "Training stopped", error=error)


def _run_config(record: JobRecord, files: JobFiles) -> TrainConfig:
    """The config the engine loads: the user's, with the base model and the adapter to continue as the
    submission resolved them (the record keeps the names the user gave: they name the model, ft:{model}:...),
    as they lie on this host."""
    resolved = {"model_name": files.model if record.model_dir else None,
                "lora_path": str(files.adapter) if files.adapter else None}  # fmt: skip
    return record.config.model_copy(update={k: v for k, v in resolved.items() if v is not None})


def _merge(record: JobRecord, settings: Settings, lease: LeaseKeeper) -> Outcome:
    from worker.training.merge import merge_adapter

    files = JobFiles.of(record, settings)
    staging.stage_training(files, settings, record.id)
    source = f"the adapter of {record.source_job}" if record.source_job else record.dataset_path
    lease.emit(InfoNotice(), f"merging {source} into {record.config.model_name}")
    path = merge_adapter(str(files.dataset), str(files.output), base_model=files.model)[0]
    staging.push_output(settings, Path(path))
    # Under the API's name for it where hosts share only the store; as written on a shared volume.
    model_path = record.output_dir if settings.store is not None else str(path)
    return Outcome(JobStatus.succeeded, "Merge completed", model_path=model_path)


def _host_tinker(record: JobRecord, settings: Settings, lease: LeaseKeeper) -> Outcome:
    from worker.jobs import child
    from worker.tinker.host import host_model

    files = JobFiles.of(record, settings)
    store = settings.store
    if store is not None:  # a base model kept in the store is staged like a training job's
        staging.stage_folder(store, Path(files.model))
    ended = host_model(record.model_copy(update={"model_dir": files.model}) if record.model_dir else record, settings,
                       lease, child.resident())  # fmt: skip
    calls = f" after {ended.calls} call{'s' if ended.calls != 1 else ''}"
    if ended.kind == "handed_back":
        return Outcome(JobStatus.queued, ended.message, count_attempt=False)
    if ended.kind == "cancelled":
        return Outcome(JobStatus.cancelled, f"Hosting cancelled{calls}", error=ended.message)
    if ended.kind == "stopped":
        return Outcome(JobStatus.failed, f"Hosting stopped{calls}", error=ended.message)
    return Outcome(JobStatus.succeeded, f"Hosting ended{calls}: {ended.message}")


def _trained_before(record: JobRecord, settings: Settings, lease: LeaseKeeper) -> Outcome | None:
    """The outcome of a job whose complete adapter an earlier run saved but could not record (its lease
    lapsed first): succeeded, without training again."""
    if record.kind != "train":
        return None
    output = JobFiles.of(record, settings).output
    if not staging.stored_output(settings, output) or not is_jobs_adapter(output, record.id):
        return None
    lease.emit(InfoNotice(), "an earlier run of this job saved its complete adapter: recorded as succeeded, "
               "without training again")  # fmt: skip
    metrics = adapter_summary(output)
    if metrics is not None:
        metrics.losses = metrics.losses[-_LOSSES_KEPT:]
    if metrics is not None:
        metrics.output_dir = record.output_dir
    return Outcome(JobStatus.succeeded, "Training completed", model_path=record.output_dir, metrics=metrics)


def run_job(job_id: str) -> None:
    settings = get_settings()
    store = JobStore(connect(settings.redis_url))
    token = uuid.uuid4().hex
    claimed = store.claim(job_id, token=token, lease_s=settings.lease_ttl_s, worker=worker_name())
    if claimed != "ok":
        # A redelivered message for a job that runs elsewhere or has ended: acknowledge and ignore it.
        log.warning("not running job %s: it is %s", job_id, claimed)
        return
    record = store.get(job_id)
    assert record is not None
    log.info("job %s (%s): %s", job_id, record.kind, record.config.model_name)
    with LeaseKeeper(store, job_id, token, settings.lease_ttl_s) as lease:
        try:
            if record.kind == "merge":
                outcome = _merge(record, settings, lease)
            elif record.kind == "tinker":
                outcome = _host_tinker(record, settings, lease)
            else:
                outcome = _trained_before(record, settings, lease) or _train(record, settings, lease)
        except StorageUnavailable as exc:  # the store is down: a clear failure, the job's state kept for a retry
            log.error("job %s: %s", job_id, exc)
            failed = {"merge": "Merge failed", "tinker": "Hosting failed"}.get(record.kind, "Training failed")
            outcome = Outcome(JobStatus.failed, failed, error=str(exc))
        except Exception as exc:
            log.error("job %s failed:\n%s", job_id, traceback.format_exc())
            failed = {"merge": "Merge failed", "tinker": "Hosting failed"}.get(record.kind, "Training failed")
            outcome = Outcome(JobStatus.failed, failed, error=f"{type(exc).__name__}: {exc}")
        if lease.fenced.is_set():
            # A complete adapter stays, marked with the job's id: whoever settles the job records it.
            log.warning("job %s: another runner owns it or it was settled; recording nothing", job_id)
            return
        if record.kind == "train":  # whatever the outcome: a failed or cancelled run keeps the steps it logged
            metrics_csv = settings.volume.step_metrics(job_id)
            if staging.push_file_quietly(settings, metrics_csv):
                register_results(
                    store.client, job_id, metrics_csv, named=staging.api_name(settings, record, metrics_csv)
                )
        # Still under the lease (its thread keeps renewing), so a Redis hiccup here cannot turn a
        # finished job into a "worker lost" one.
        lease.recording_outcome()
        recorded = _record_outcome(store, job_id, token, outcome, lease.latest, patience_s=3 * settings.lease_ttl_s)
        # Only once the job's end is recorded does its saved state go: a job requeued meanwhile by the
        # reaper (its outcome then not ours to record) continues from it.
        if recorded is not None and recorded.terminal:
            _drop_state(settings.volume.job_state(job_id))
            with contextlib.suppress(StorageUnavailable):  # a store that is down keeps a stale state: harmless
                staging.drop_state(settings, job_id)
        if recorded is JobStatus.queued:
            log.info("job %s: handed back to the queue, first in line", job_id)
        elif recorded is not None and record.kind != "tinker":
            staging.tidy(settings, JobFiles.of(record, settings), job_id)
    _start_next(store, settings)


def _drop_state(state: Path) -> None:
    shutil.rmtree(state, ignore_errors=True)
    with contextlib.suppress(OSError):  # the states' folder goes too once no job keeps one
        state.parent.rmdir()


def _start_next(store: JobStore, settings: Settings) -> None:
    """This job's slot is free: hand it to the job waiting longest now, not at the next reaper round."""
    from worker.jobs.celery_app import app

    try:
        promote_waiting(store, app, settings)
    except redis.RedisError as exc:  # the reaper does it a few seconds later
        log.warning("could not start the next waiting job: %s", exc)


def _record_outcome(
    store: JobStore, job_id: str, token: str, outcome: Outcome, progress: Progress | None, *, patience_s: float
) -> JobStatus | None:
    """The status recorded (None when someone else settled the job first)."""
    deadline = time.monotonic() + patience_s
    delay = 0.5
    while True:
        try:
            if outcome.status is JobStatus.queued:
                return store.hand_back(job_id, token=token, reason=outcome.message,
                                       count_attempt=outcome.count_attempt, progress=progress)  # fmt: skip
            recorded = store.finish(
                job_id,
                token=token,
                status=outcome.status,
                message=outcome.message,
                error=outcome.error,
                model_path=outcome.model_path,
                metrics=outcome.metrics,
                progress=progress,
            )
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if time.monotonic() > deadline:
                log.error("job %s: could not record %s: %s", job_id, outcome.status.value, exc)
                raise
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
            continue
        if recorded is None:
            log.warning("job %s: was settled by someone else before its %s was recorded", job_id, outcome.status.value)
        return recorded
