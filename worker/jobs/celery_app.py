"""The worker's Celery application: `celery -A worker.jobs.celery_app worker`."""

from __future__ import annotations

from typing import Any

from celery.signals import worker_process_init, worker_ready, worker_shutdown, worker_shutting_down

from shared.celery_factory import make_celery
from shared.settings import get_settings
from worker.quiet import disable_progress_bars

disable_progress_bars()  # before any library loads: Celery would log each bar's line as a WARNING
app = make_celery(get_settings(), include=["worker.jobs.tasks"])


@worker_ready.connect
def _on_ready(sender: Any = None, **_: Any) -> None:
    from worker.jobs.maintenance import start_maintenance, worker_info
    from worker.jobs.runner import worker_name

    # its slots: the pool's processes, each training one job at a time
    slots = int(getattr(getattr(sender, "controller", None), "concurrency", None) or app.conf.worker_concurrency or 1)
    name = getattr(sender, "hostname", None) or "worker"
    start_maintenance(app, get_settings(), worker_info(name, slots, runner=worker_name(parent=True)))


@worker_shutdown.connect
def _on_shutdown(sender: Any = None, **_: Any) -> None:
    from worker.jobs.maintenance import leave

    leave(get_settings(), getattr(sender, "hostname", None) or "worker")


@worker_shutting_down.connect
def _on_shutting_down(**_: Any) -> None:
    from worker.jobs.shutdown import forward_to_children

    forward_to_children()  # a SIGTERM to this process alone (docker stop) reaches the running job too


@worker_process_init.connect
def _on_child_start(**_: Any) -> None:
    from worker.jobs import child  # in the pool child, before its first job imports torch

    child.start(get_settings())
