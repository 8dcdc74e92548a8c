"""Capacity from the live workers' announcements, against a real Redis-compatible server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import redis
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_fixed

from shared import keys, workers
from shared.settings import Settings

# Announcements expire after fresh_s: max(10 s, three reap intervals).
SETTINGS = Settings(reap_interval_s=0.5)


def _info(name: str, slots: int = 1, **kw: object) -> workers.WorkerInfo:
    return workers.WorkerInfo(name=name, host=name.partition("@")[2], slots=slots, runner=f"{name}:1", **kw)  # type: ignore[arg-type]


def test_capacity_is_the_sum_of_the_live_workers_slots(redis_client: redis.Redis) -> None:
    assert workers.capacity(redis_client, SETTINGS) == 0
    workers.announce(redis_client, _info("gpu0@a", gpu="NVIDIA H100 80GB HBM3", gpu_memory_mib=81559), SETTINGS)
    workers.announce(redis_client, _info("node@b", slots=4), SETTINGS)
    assert workers.capacity(redis_client, SETTINGS) == 5
    (a, _), (b, _) = workers.live(redis_client, SETTINGS)
    assert (a.name, a.host, a.gpu, a.gpu_memory_mib) == ("gpu0@a", "a", "NVIDIA H100 80GB HBM3", 81559)
    assert (b.name, b.slots, b.gpu) == ("node@b", 4, None)


def test_a_cap_limits_the_slots_but_never_adds_any(redis_client: redis.Redis) -> None:
    capped = Settings(reap_interval_s=0.5, max_concurrent_jobs=2)
    assert workers.capacity(redis_client, capped) == 0  # a cap is not a worker
    workers.announce(redis_client, _info("w@a", slots=1), capped)
    assert workers.capacity(redis_client, capped) == 1
    workers.announce(redis_client, _info("w@b", slots=3), capped)
    assert workers.capacity(redis_client, capped) == 2


def test_a_worker_that_leaves_takes_its_slots_at_once(redis_client: redis.Redis) -> None:
    workers.announce(redis_client, _info("w@a", slots=2), SETTINGS)
    workers.announce(redis_client, _info("w@b"), SETTINGS)
    workers.leave(redis_client, "w@a")
    assert [info.name for info, _ in workers.live(redis_client, SETTINGS)] == ["w@b"]
    assert workers.capacity(redis_client, SETTINGS) == 1
    assert not redis_client.exists(keys.worker_info_key("w@a"))


def test_a_silent_worker_lapses_on_the_servers_clock(redis_client: redis.Redis) -> None:
    """A host that died says nothing: its heartbeat ages past fresh_s and its slots go (its announcement
    also expires, so nothing is left behind)."""
    workers.announce(redis_client, _info("w@dead", slots=2), SETTINGS)
    stale_ms = workers._now_ms(redis_client) - int(workers.fresh_s(SETTINGS) * 1000) - 1
    redis_client.zadd(keys.WORKERS, {"w@dead": stale_ms})  # its last announcement, fresh_s ago
    workers.announce(redis_client, _info("w@alive"), SETTINGS)
    assert workers.capacity(redis_client, SETTINGS) == 1
    ttl_ms = redis_client.pttl(keys.worker_info_key("w@alive"))
    assert 0 < ttl_ms <= workers.fresh_s(SETTINGS) * 1000


def test_the_announcement_expires_with_the_heartbeat(redis_client: redis.Redis) -> None:
    short = Settings(reap_interval_s=0.01)  # fresh_s is still 10 s: the floor
    assert workers.fresh_s(short) == 10.0
    workers.announce(redis_client, _info("w@a"), short)
    redis_client.pexpire(keys.worker_info_key("w@a"), 50)  # as if 10 s had passed for the key
    for attempt in Retrying(stop=stop_after_delay(5), wait=wait_fixed(0.05),
                            retry=retry_if_exception_type(AssertionError), reraise=True):  # fmt: skip
        with attempt:
            assert not redis_client.exists(keys.worker_info_key("w@a"))
    # Still heartbeating without its details (a worker of an older version): one slot, named by its host.
    ((info, _),) = workers.live(redis_client, short)
    assert (info.name, info.host, info.slots) == ("w@a", "a", 1)


def test_the_overview_names_each_workers_jobs(redis_client: redis.Redis) -> None:
    workers.announce(redis_client, _info("w@a", slots=2), SETTINGS)
    workers.announce(redis_client, _info("w@b"), SETTINGS)
    active = [("job-1", "w@a:1", "running"), ("job-2", None, "queued"), ("job-3", "w@b:1", "pausing")]
    shown = workers.overview(redis_client, SETTINGS, active)
    assert (shown.slots, shown.busy, shown.free, shown.cap) == (3, 3, 0, None)
    a, b = shown.workers
    assert (a.busy, a.job_id, a.jobs) == (False, "job-1", ["job-1"])  # one of its two slots trains
    assert (b.busy, b.job_id, b.jobs) == (True, "job-3", ["job-3"])


def test_a_starting_worker_drops_the_dead_workers_of_its_own_host(redis_client: redis.Redis) -> None:
    """Killed and started again under another name: the dead one's slot must not count beside the new one's."""
    here = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process id that no longer runs
    ns = workers.pid_namespace()
    assert ns is not None and ns.startswith("pid:[")
    neighbours = (("old@h", dead.pid, here, ns), ("live@h", os.getpid(), here, ns), ("far@x", dead.pid, "far", ns),
                  ("other-container@h", dead.pid, here, "pid:[1]"))  # fmt: skip
    for name, pid, host, namespace in neighbours:
        info = workers.WorkerInfo(name=name, host=host, runner=f"{host}:{pid}", pid_ns=namespace)
        workers.announce(redis_client, info, SETTINGS)
    me = workers.WorkerInfo(name="new@h", host=here, runner=f"{here}:{os.getpid()}", pid_ns=ns)
    assert workers.forget_dead_neighbours(redis_client, me, SETTINGS) == ["old@h"]
    alive = [info.name for info, _ in workers.live(redis_client, SETTINGS)]
    assert alive == ["far@x", "live@h", "other-container@h"]  # another namespace's pid says nothing here
