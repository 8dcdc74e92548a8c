"""The job store: job records, state transitions, progress, events and slots, all in Redis."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, cast

import redis

from shared import keys, lua_scripts, stream_ids
from shared.config import TrainConfig
from shared.events import EventPayload, JobEvent, event_type
from shared.files import remove_file, result_file_id
from shared.job_ids import is_job_id
from shared.jobs import JobRecord, JobStatus, Progress, WandbSpec
from shared.metrics import TrainingSummary


@dataclass(frozen=True)
class AdmitResult:
    admitted: bool  # holds a slot now (its task is to be published)
    running: list[str]  # ids holding the slots when refused
    waiting: int | None = None  # its place in the waiting line (1 = next), when it waits for a slot
    line_full: bool = False  # it asked to wait but the waiting line is full

    @property
    def accepted(self) -> bool:
        return self.admitted or self.waiting is not None


def connect(url: str, *, timeout: float = 5.0) -> redis.Redis:
    """A client that fails fast instead of hanging when the server is gone."""
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        health_check_interval=15,
    )


def _record_to_fields(record: JobRecord) -> dict[str, str]:
    return {
        "id": record.id,
        "kind": record.kind,
        "status": record.status.value,
        "config": record.config.model_dump_json(),
        "dataset_path": record.dataset_path,
        "validation_path": record.validation_path or "",
        "source_job": record.source_job or "",
        "tinker_model": record.tinker_model or "",
        "model_dir": record.model_dir or "",
        "base_model": record.base_model or "",
        "adapter_dir": record.adapter_dir or "",
        "num_records": str(record.num_records),
        "output_dir": record.output_dir,
        "volume_base": record.volume_base or "",
        "message": record.message,
        "attempts": str(record.attempts),
        "max_attempts": str(record.max_attempts),
        "cancel_requested": "0",
        "progress": record.progress.model_dump_json(),
        "metrics": record.metrics.model_dump_json() if record.metrics else "",
        "wandb": record.wandb.model_dump_json() if record.wandb else "",
    }


def _record_from_fields(fields: dict[str, str]) -> JobRecord:
    def opt_float(name: str) -> float | None:
        value = fields.get(name)
        return float(value) if value else None

    return JobRecord(
        id=fields["id"],
        kind=fields["kind"] if fields.get("kind") in ("merge", "tinker") else "train",  # type: ignore[arg-type]
        status=JobStatus(fields["status"]),
        created_at=float(fields.get("created_at") or 0.0),
        started_at=opt_float("started_at"),
        finished_at=opt_float("finished_at"),
        config=TrainConfig.model_validate_json(fields["config"]),
        dataset_path=fields["dataset_path"],
        validation_path=fields.get("validation_path") or None,
        source_job=fields.get("source_job") or None,
        tinker_model=fields.get("tinker_model") or None,
        model_dir=fields.get("model_dir") or None,
        base_model=fields.get("base_model") or None,
        adapter_dir=fields.get("adapter_dir") or None,
        num_records=int(fields.get("num_records") or 0),
        output_dir=fields["output_dir"],
        model_path=fields.get("model_path") or None,
        volume_base=fields.get("volume_base") or None,
        message=fields.get("message", ""),
        error=fields.get("error") or None,
        attempts=int(fields.get("attempts") or 0),
        max_attempts=int(fields.get("max_attempts") or 1),
        worker=fields.get("worker") or None,
        cancel_requested=fields.get("cancel_requested") == "1",
        progress=Progress.model_validate_json(fields.get("progress") or "{}"),
        metrics=_summary(fields.get("metrics")),
        wandb=WandbSpec.model_validate_json(fields["wandb"]) if fields.get("wandb") else None,
    )


def _summary(text: str | None) -> TrainingSummary | None:
    # "{}": what records written before the summary was typed hold for "none".
    return TrainingSummary.model_validate_json(text) if text and text != "{}" else None


def _events(rows: Any) -> list[JobEvent]:
    return [
        JobEvent.model_validate(
            {
                "id": str(event_id),
                "type": fields.get("type", ""),
                "created_at": float(fields.get("ts") or 0.0),
                "message": fields.get("message", ""),
                "data": json.loads(fields.get("data") or "{}"),
            }
        )
        for event_id, fields in cast(list[tuple[str, dict[str, str]]], rows)
    ]


def _flatten(fields: dict[str, str]) -> list[str]:
    return [item for pair in fields.items() for item in pair]


class JobStore:
    """Typed access to job state. Every transition is one Lua script (see shared.lua_scripts)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._admit = client.register_script(lua_scripts.ADMIT)
        self._claim = client.register_script(lua_scripts.CLAIM)
        self._renew = client.register_script(lua_scripts.RENEW)
        self._finish = client.register_script(lua_scripts.FINISH)
        self._cancel = client.register_script(lua_scripts.CANCEL)
        self._reap = client.register_script(lua_scripts.REAP)
        self._abort = client.register_script(lua_scripts.ABORT)
        self._promote = client.register_script(lua_scripts.PROMOTE)
        self._pause = client.register_script(lua_scripts.PAUSE)
        self._resume = client.register_script(lua_scripts.RESUME)
        self._hand_back = client.register_script(lua_scripts.HAND_BACK)
        self._settle_complete = client.register_script(lua_scripts.SETTLE_COMPLETE)

    def ping(self) -> bool:
        return bool(self.client.ping())

    def admit(self, record: JobRecord, *, max_slots: int, queue_timeout_s: float, max_waiting: int = 0) -> AdmitResult:
        """Create the record and take a free slot in one step. With `max_waiting` > 0 a job that finds
        no free slot (or others already waiting) joins the waiting line instead, while it has room;
        with 0 it is refused (nothing is written)."""
        result = self._admit(
            keys=[keys.ACTIVE, keys.JOBS, keys.job_key(record.id), keys.events_key(record.id), keys.WAITING],
            args=[
                record.id,
                max_slots,
                int(queue_timeout_s * 1000),
                max_waiting,
                *_flatten(_record_to_fields(record)),
            ],
        )
        code, detail = cast(list[Any], result)
        if code == 1:
            return AdmitResult(admitted=True, running=[])
        if code == 2:
            return AdmitResult(admitted=False, running=[], waiting=int(detail[0]))
        return AdmitResult(admitted=False, running=[str(x) for x in detail], line_full=code == 3)

    def promote(self, *, max_slots: int, queue_timeout_s: float) -> list[str]:
        """Move the longest-waiting jobs into free slots; returns their ids, whose tasks the caller publishes."""
        result = self._promote(
            keys=[keys.ACTIVE, keys.WAITING],
            args=[max_slots, int(queue_timeout_s * 1000), keys.JOB_PREFIX, keys.EVENTS_SUFFIX],
        )
        return [str(x) for x in cast(list[Any], result)]

    def waiting_ids(self) -> list[str]:
        """Jobs waiting for a slot, first in line first."""
        return cast(list[str], self.client.zrange(keys.WAITING, 0, -1))

    def waiting_count(self) -> int:
        return int(cast(int, self.client.zcard(keys.WAITING)))

    def queue_position(self, job_id: str) -> int | None:
        """1 for the next job to get a slot; None when the job is not waiting."""
        rank = cast(int | None, self.client.zrank(keys.WAITING, job_id))
        return None if rank is None else rank + 1

    def pause(self, job_id: str) -> str:
        """'paused' (it had not started), 'pausing' (its worker saves its state and stops), 'missing'
        or the status that does not allow a pause."""
        if not is_job_id(job_id):
            return "missing"
        return str(
            self._pause(keys=[keys.job_key(job_id), keys.ACTIVE, keys.events_key(job_id), keys.WAITING], args=[job_id])
        )

    def resume(self, job_id: str) -> str:
        """'resumed' (queued in the waiting line; `promote` starts it), 'missing' or the status found."""
        if not is_job_id(job_id):
            return "missing"
        return str(self._resume(keys=[keys.job_key(job_id), keys.events_key(job_id), keys.WAITING], args=[job_id]))

    def get(self, job_id: str) -> JobRecord | None:
        if not is_job_id(job_id):
            return None
        fields = cast(dict[str, str], self.client.hgetall(keys.job_key(job_id)))
        return _record_from_fields(fields) if fields.get("id") else None

    def active_ids(self) -> list[str]:
        """Jobs holding a slot, oldest first (the active set itself is ordered by lease deadline)."""
        ids = cast(list[str], self.client.zrange(keys.ACTIVE, 0, -1))
        if len(ids) < 2:
            return ids
        created = cast(list[float | None], self.client.zmscore(keys.JOBS, ids))
        return [job_id for _, job_id in sorted(zip(created, ids, strict=True), key=lambda p: (p[0] or 0.0, p[1]))]

    def current(self) -> JobRecord | None:
        """The oldest job holding a slot, else the most recently created job."""
        for job_id in self.active_ids():
            record = self.get(job_id)
            if record is not None:
                return record
        for job_id in cast(list[str], self.client.zrevrange(keys.JOBS, 0, 0)):
            return self.get(job_id)
        return None

    def list_ids(self, *, before: float | None = None, limit: int = 20) -> list[tuple[str, float]]:
        """Job ids newest first, with their creation time (ms), strictly before `before`."""
        top: float | str = f"({before}" if before is not None else "+inf"
        rows = self.client.zrevrangebyscore(keys.JOBS, top, "-inf", start=0, num=limit, withscores=True)
        return [(str(job_id), float(score)) for job_id, score in cast(list[tuple[str, float]], rows)]

    def claim(self, job_id: str, *, token: str, lease_s: float, worker: str) -> str:
        """'ok' when this runner now owns the job, else the status that stopped it."""
        return str(
            self._claim(
                keys=[keys.job_key(job_id), keys.ACTIVE, keys.events_key(job_id)],
                args=[job_id, token, int(lease_s * 1000), worker],
            )
        )

    def renew(
        self, job_id: str, *, token: str, lease_s: float, progress: Progress | None, message: str | None = None
    ) -> int:
        """Extend the lease (and store progress, and `message`, what the run is doing now, unless a cancel or a
        pause was asked): -1 fenced out, 1 cancel requested, 2 pause requested, 0 carry on."""
        payload = progress.model_dump_json() if progress is not None else ""
        return int(
            cast(
                int,
                self._renew(
                    keys=[keys.job_key(job_id), keys.ACTIVE],
                    args=[job_id, token, int(lease_s * 1000), payload, message or ""],
                ),
            )
        )

    def finish(
        self,
        job_id: str,
        *,
        token: str,
        status: JobStatus,
        message: str,
        error: str | None = None,
        model_path: str | None = None,
        metrics: TrainingSummary | None = None,
        progress: Progress | None = None,
    ) -> JobStatus | None:
        """Record the outcome and free the slot, if this runner still owns the job: the status recorded
        (`cancelled` for a `paused` outcome when a cancel came while it paused), None when not its to record."""
        fields: dict[str, str] = {"message": message}
        if error is not None:
            fields["error"] = error
        if model_path is not None:
            fields["model_path"] = model_path
        if metrics is not None:
            fields["metrics"] = metrics.model_dump_json()
        if progress is not None:
            fields["progress"] = progress.model_dump_json()
        event_message = error if error else message
        data = json.dumps({"status": status.value})
        done = self._finish(
            keys=[keys.job_key(job_id), keys.ACTIVE, keys.events_key(job_id)],
            args=[job_id, token, status.value, event_message, data, *_flatten(fields)],
        )
        return JobStatus(done) if done else None

    def hand_back(
        self, job_id: str, *, token: str, reason: str, count_attempt: bool, progress: Progress | None = None
    ) -> JobStatus | None:
        """Queue a job this runner stopped (for a reason that is not the job's) again, first in line; it
        continues from its saved state. The status recorded (`paused`/`cancelled` when one was asked
        meanwhile), None when the job was not this runner's to hand back."""
        fields = {"message": f"Queued first in line: {reason}"}
        if progress is not None:
            fields["progress"] = progress.model_dump_json()
        done = self._hand_back(
            keys=[keys.job_key(job_id), keys.ACTIVE, keys.events_key(job_id), keys.WAITING],
            args=[job_id, token, reason, "1" if count_attempt else "0", *_flatten(fields)],
        )
        return JobStatus(done) if done else None

    def lapsed_running(self) -> list[str]:
        """Jobs holding a slot whose lease (or queue deadline) has passed: what `reap` settles next."""
        return cast(list[str], self.client.zrangebyscore(keys.ACTIVE, "-inf", self._now_ms()))

    def settle_complete(self, job_id: str, *, model_path: str, metrics: TrainingSummary | None) -> bool:
        """Record as succeeded a job whose lease lapsed but whose complete adapter one of its runs wrote."""
        fields = {"message": "Training completed", "model_path": model_path}
        if metrics is not None:
            fields["metrics"] = metrics.model_dump_json()
        message = "Job succeeded: its adapter was complete on disk when its lapsed lease was settled"
        return bool(
            self._settle_complete(
                keys=[keys.job_key(job_id), keys.ACTIVE, keys.events_key(job_id)],
                args=[job_id, message, *_flatten(fields)],
            )
        )

    def cancel(self, job_id: str) -> str:
        """'removed' (was queued or paused), 'requested' (running; the worker stops soon), 'missing' or the
        final status."""
        if not is_job_id(job_id):
            return "missing"
        return str(
            self._cancel(
                keys=[keys.job_key(job_id), keys.ACTIVE, keys.events_key(job_id), keys.WAITING],
                args=[job_id],
            )
        )

    def abort(self, job_id: str, error: str) -> bool:
        """Fail a job that is still queued (its task could not be published) and free its slot."""
        return bool(
            self._abort(
                keys=[keys.job_key(job_id), keys.ACTIVE, keys.events_key(job_id), keys.WAITING], args=[job_id, error]
            )
        )

    def reap(self, *, queue_timeout_s: float) -> list[str]:
        """Settle jobs whose lease lapsed; returns ids requeued for another attempt."""
        result = self._reap(
            keys=[keys.ACTIVE],
            args=[keys.JOB_PREFIX, keys.EVENTS_SUFFIX, int(queue_timeout_s * 1000)],
        )
        return [str(x) for x in cast(list[Any], result)]

    def add_event(self, job_id: str, payload: EventPayload, message: str) -> str:
        """Append an event; its type is the payload's (see shared.events)."""
        return str(
            self.client.xadd(
                keys.events_key(job_id),
                {
                    "type": event_type(payload),
                    "ts": f"{time.time():.3f}",
                    "message": message,
                    "data": payload.model_dump_json(),
                },
                maxlen=100_000,
                approximate=True,
            )
        )

    def events(self, job_id: str, *, after: str | None = None, limit: int = 100) -> list[JobEvent]:
        """Up to `limit` events, oldest first, after the stream id `after`."""
        if not is_job_id(job_id) or after == stream_ids.LAST:  # Redis refuses a range after the last possible id
            return []
        start = f"({after}" if after else "-"
        return _events(self.client.xrange(keys.events_key(job_id), min=start, max="+", count=limit))

    def events_newest_first(self, job_id: str, *, before: str | None = None, limit: int = 100) -> list[JobEvent]:
        """Up to `limit` events, newest first, older than the stream id `before`."""
        if not is_job_id(job_id) or before == stream_ids.FIRST:  # nor one before the first
            return []
        top = f"({before}" if before else "+"
        return _events(self.client.xrevrange(keys.events_key(job_id), max=top, min="-", count=limit))

    def prune(self, *, older_than_s: float, limit: int = 200) -> list[str]:
        """Delete the records and events of ended jobs created more than `older_than_s` ago; returns their ids.

        Redis runs with `noeviction`: without a retention, per-step events would fill it and stop the service.
        """
        cutoff = self._now_ms() - int(older_than_s * 1000)
        ids = cast(list[str], self.client.zrangebyscore(keys.JOBS, "-inf", cutoff, start=0, num=limit))
        removed: list[str] = []
        for job_id in ids:
            status = cast(str | None, self.client.hget(keys.job_key(job_id), "status"))
            if status is not None and not JobStatus(status).terminal:
                continue
            self.client.delete(keys.job_key(job_id), keys.events_key(job_id), keys.openai_job_key(job_id))
            remove_file(self.client, result_file_id(job_id))  # its CSV goes with the job's checkpoint folder
            self.client.zrem(keys.JOBS, job_id)
            removed.append(job_id)
        return removed

    def count_by_status(self) -> dict[str, int]:
        """Jobs per status over the whole history (one pipelined read per 500 jobs)."""
        counts: dict[str, int] = {}
        ids = cast(list[str], self.client.zrange(keys.JOBS, 0, -1))
        for start in range(0, len(ids), 500):
            pipe = self.client.pipeline(transaction=False)
            for job_id in ids[start : start + 500]:
                pipe.hget(keys.job_key(job_id), "status")
            for status in pipe.execute():
                if status:
                    counts[status] = counts.get(status, 0) + 1
        return counts

    def _now_ms(self) -> int:
        """The server's clock, like the Lua scripts use: hosts' clocks may disagree."""
        seconds, micros = cast(tuple[int, int], self.client.time())
        return seconds * 1000 + micros // 1000

    def slot_holders(self) -> list[tuple[str, str | None, str]]:
        """The jobs holding a slot: (id, the worker that runs it, status), in one pipelined read."""
        ids = self.active_ids()
        pipe = self.client.pipeline(transaction=False)
        for job_id in ids:
            pipe.hmget(keys.job_key(job_id), ["worker", "status"])
        rows = cast(list[list[str | None]], pipe.execute()) if ids else []
        return [(job_id, row[0] or None, row[1] or "") for job_id, row in zip(ids, rows, strict=True)]

    # Base models in use (what /v1/models lists and chat resolves), without reading every job.
    def note_base_model(self, name: str, *, at_ms: int | None = None) -> None:
        """Record that a training job uses base model `name` (its first use is kept)."""
        self.client.zadd(keys.BASE_MODELS, {name: at_ms if at_ms is not None else self._now_ms()}, nx=True)

    def base_models(self) -> list[tuple[str, int]]:
        """(name, first use in ms), oldest first."""
        rows = cast(list[tuple[str, float]], self.client.zrange(keys.BASE_MODELS, 0, -1, withscores=True))
        return [(str(name), int(score)) for name, score in rows]

    def base_model_first_use(self, name: str) -> int | None:
        score = cast(float | None, self.client.zscore(keys.BASE_MODELS, name))
        return None if score is None else int(score)

    def has_base_model_index(self) -> bool:
        return bool(self.client.exists(keys.BASE_MODELS))
