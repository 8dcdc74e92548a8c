"""The worker's housekeeping thread (main process): heartbeat for readiness, and the reaper.

Every worker reaps, so lapsed leases are settled even when no API process is running.
"""

from __future__ import annotations

import logging
import threading

from celery import Celery

from shared.reaper import reap_once
from shared.settings import Settings
from shared.store import JobStore, connect

log = logging.getLogger(__name__)


def start_maintenance(celery: Celery, settings: Settings, name: str) -> threading.Event:
    stop = threading.Event()

    def run() -> None:
        store = JobStore(connect(settings.redis_url))
        while not stop.is_set():
            try:
                store.heartbeat_worker(name)
                reap_once(store, celery, settings)
            except Exception as exc:  # Redis down: the worker keeps trying until it returns
                log.debug("maintenance: %s", exc)
            stop.wait(settings.reap_interval_s)

    threading.Thread(target=run, name="lora-maintenance", daemon=True).start()
    return stop


def leave(settings: Settings, name: str) -> None:
    """Drop this worker from the live set at shutdown, so readiness reflects it at once."""
    try:
        JobStore(connect(settings.redis_url, timeout=2)).forget_worker(name)
    except Exception as exc:
        log.debug("could not deregister %s: %s", name, exc)
