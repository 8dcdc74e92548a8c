"""The training workers that are alive, and the capacity they bring: no slot count to keep in step with the GPUs.

Each training worker's main process announces itself every reap interval (`announce`): its name, host, training
slots (its pool's concurrency: one per GPU), GPU and memory, and the id its jobs record as their `worker`. The
announcement expires: a worker silent for `fresh_s` (three intervals, at least 10 s) is gone, whether it stopped
(it says so: `leave`) or its host died. Admission (`capacity`) counts the slots of the live workers, capped by
`LORA_MAX_CONCURRENT_JOBS` where that is set: a worker started on a new host raises it, one lost lowers it.
A job whose worker vanished loses its lease and is resumed elsewhere from its saved state (shared.reaper).
"""

from __future__ import annotations

import os
import socket
from typing import cast

import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared import keys
from shared.settings import Settings


class WorkerInfo(BaseModel):
    """What a training worker announces."""

    model_config = ConfigDict(extra="ignore")

    name: str  # its node name (gpu0@host)
    host: str
    slots: int = Field(default=1, ge=0)  # jobs it trains at once (its pool's concurrency)
    gpu: str | None = None  # the GPU's name; None on a CPU worker
    gpu_memory_mib: int | None = None
    runner: str | None = None  # what its jobs record as their `worker` (shared.jobs.JobRecord.worker)
    pid_ns: str | None = None  # its process-id namespace (Linux): where its runner's pid means that process


class LiveWorker(WorkerInfo):
    """A live worker as /health and the dashboard show it."""

    busy: bool = False  # every slot trains a job
    job_id: str | None = None  # the job it trains now (its first, on a worker of several slots)
    jobs: list[str] = Field(default_factory=list)  # every job it trains now


def fresh_s(settings: Settings) -> float:
    """A worker announces itself every reap interval; silent for three of them (at least 10 s) means gone."""
    return max(10.0, 3 * settings.reap_interval_s)


def _now_ms(client: redis.Redis) -> int:
    """The server's clock (hosts' clocks may disagree)."""
    seconds, micros = cast(tuple[int, int], client.time())
    return seconds * 1000 + micros // 1000


def announce(client: redis.Redis, info: WorkerInfo, settings: Settings) -> None:
    """Say `info`'s worker is alive: its heartbeat and what it brings, both expiring unless said again."""
    pipe = client.pipeline()
    pipe.set(keys.worker_info_key(info.name), info.model_dump_json(), px=int(fresh_s(settings) * 1000))
    pipe.zadd(keys.WORKERS, {info.name: _now_ms(client)})
    pipe.execute()


def leave(client: redis.Redis, name: str) -> None:
    """The worker stops: its capacity goes at once, not when its heartbeat lapses."""
    pipe = client.pipeline()
    pipe.zrem(keys.WORKERS, name)
    pipe.delete(keys.worker_info_key(name))
    pipe.execute()


def pid_namespace() -> str | None:
    """This process's pid namespace ("pid:[4026531836]"), or None where there is no /proc to say."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


def forget_dead_neighbours(client: redis.Redis, info: WorkerInfo, settings: Settings) -> list[str]:
    """Drop the announcements of workers on this same host whose main process is gone (a worker killed and
    started again under another name): their slots would otherwise count until their heartbeat lapses, and a
    replacement would double them. Only this host can tell; returns the names dropped."""
    dropped = []
    for other, _ in live(client, settings):
        if other.name == info.name or other.host != info.host or not other.runner:
            continue
        if info.pid_ns is None or other.pid_ns != info.pid_ns:  # containers sharing a hostname: pids differ
            continue
        host, _, pid = other.runner.rpartition(":")
        if host == socket.gethostname() and pid.isdigit() and _process_gone(int(pid)):
            leave(client, other.name)
            dropped.append(other.name)
    return dropped


def live(client: redis.Redis, settings: Settings) -> list[tuple[WorkerInfo, int]]:
    """The live workers with the time of their last announcement (ms, the server's clock), by name. A worker
    that heartbeats without saying what it brings (one started before announcements) counts as one slot."""
    now = _now_ms(client)
    rows = cast(
        list[tuple[str, float]],
        client.zrangebyscore(keys.WORKERS, now - int(fresh_s(settings) * 1000), "+inf", withscores=True),
    )
    if not rows:
        return []
    raws = cast(list[str | None], client.mget([keys.worker_info_key(name) for name, _ in rows]))
    workers = []
    for (name, seen), raw in zip(rows, raws, strict=True):
        info: WorkerInfo | None = None
        if raw:
            try:
                info = WorkerInfo.model_validate_json(raw)
            except ValidationError:
                info = None
        workers.append((info or WorkerInfo(name=name, host=name.partition("@")[2] or name), int(seen)))
    return sorted(workers, key=lambda pair: pair[0].name)


def live_slots(client: redis.Redis, settings: Settings) -> int:
    return sum(info.slots for info, _ in live(client, settings))


def capacity(client: redis.Redis, settings: Settings) -> int:
    """Training slots now: the live workers' slots, capped by LORA_MAX_CONCURRENT_JOBS where it is set."""
    slots = live_slots(client, settings)
    cap = settings.max_concurrent_jobs
    return slots if cap is None else min(slots, cap)


def describe(client: redis.Redis, settings: Settings, running: dict[str, list[str]]) -> list[LiveWorker]:
    """The live workers, each with the jobs it trains (`running`: a running job's `worker` -> the job ids)."""
    out = []
    for info, _ in live(client, settings):
        jobs = running.get(info.runner or "", [])
        out.append(LiveWorker(**info.model_dump(), busy=len(jobs) >= max(1, info.slots), job_id=next(iter(jobs), None),
                              jobs=jobs))  # fmt: skip
    return out


class Capacity(BaseModel):
    """The training slots now: what /health, /status and the dashboard show."""

    slots: int  # what admission counts: the live workers' slots, capped
    busy: int  # slots held by jobs (queued for a worker, or running)
    free: int
    cap: int | None = None  # LORA_MAX_CONCURRENT_JOBS, when set (left out of /status when unset)
    workers: list[LiveWorker]


def overview(client: redis.Redis, settings: Settings, active: list[tuple[str, str | None, str]]) -> Capacity:
    """`active`: the jobs holding a slot, as (id, the `worker` that runs it or None, status)."""
    running: dict[str, list[str]] = {}
    for job_id, worker, status in active:
        if worker and status in ("running", "pausing"):
            running.setdefault(worker, []).append(job_id)
    slots = capacity(client, settings)
    return Capacity(slots=slots, busy=len(active), free=max(0, slots - len(active)), cap=settings.max_concurrent_jobs,
                    workers=describe(client, settings, running))  # fmt: skip
