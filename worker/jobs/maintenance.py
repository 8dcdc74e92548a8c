"""The worker's housekeeping thread (main process): its announcement (shared.workers), and the reaper.

Every worker reaps, so lapsed leases are settled even when no API process is running.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import threading

from celery import Celery

from shared import workers
from shared.reaper import reap_once
from shared.settings import Settings
from shared.store import JobStore, connect

log = logging.getLogger(__name__)


def visible_gpu() -> tuple[str | None, int | None]:
    """The name and memory (MiB) of the first GPU this worker's jobs see, from nvidia-smi: the main process must
    not initialise CUDA (its pool children are forked from it). (None, None) on a host without one."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None, None
    try:
        out = subprocess.run([smi, "--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        log.info("nvidia-smi gave no GPU list: %s", exc)
        return None, None
    rows = [[part.strip() for part in line.split(",")] for line in out.splitlines() if line.count(",") >= 3]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    for index, uuid, name, memory in rows:
        if not visible or visible in (index, uuid):
            return name, int(float(memory)) if memory.replace(".", "", 1).isdigit() else None
    return None, None


def worker_info(name: str, slots: int, runner: str) -> workers.WorkerInfo:
    gpu, memory = visible_gpu()
    return workers.WorkerInfo(name=name, host=socket.gethostname(), slots=slots, gpu=gpu, gpu_memory_mib=memory,
                              runner=runner, pid_ns=workers.pid_namespace())  # fmt: skip


def start_maintenance(celery: Celery, settings: Settings, info: workers.WorkerInfo) -> threading.Event:
    stop = threading.Event()

    def run() -> None:
        store = JobStore(connect(settings.redis_url))
        while not stop.is_set():
            try:
                for gone in workers.forget_dead_neighbours(store.client, info, settings):
                    log.info("worker %s on this host is gone: its slots no longer count", gone)
                workers.announce(store.client, info, settings)
                reap_once(store, celery, settings)
            except Exception as exc:  # Redis down: the worker keeps trying until it returns
                log.debug("maintenance: %s", exc)
            stop.wait(settings.reap_interval_s)

    threading.Thread(target=run, name="lora-maintenance", daemon=True).start()
    return stop


def leave(settings: Settings, name: str) -> None:
    """Drop this worker from the live set at shutdown, so capacity and readiness reflect it at once."""
    try:
        workers.leave(connect(settings.redis_url, timeout=2), name)
    except Exception as exc:
        log.debug("could not deregister %s: %s", name, exc)
