"""A worker's pool child between jobs: its compile caches, the base model it keeps, and when it must go.

With `keep_base_model` one child runs job after job and keeps the last job's base model loaded
(`worker.training.resident`); after each job it frees what the job left and checks memory, and asks
to be replaced (`worker.jobs.recycle`) when more is held than the base. Without it, Celery gives each
job a fresh child (`shared.celery_factory`) and nothing is kept.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from shared.celery_factory import RECYCLE_THRESHOLD_KB
from shared.settings import Settings
from worker import cpu_budget
from worker.jobs import compile_cache, recycle
from worker.quiet import disable_progress_bars

if TYPE_CHECKING:
    from worker.training.resident import ResidentBase

log = logging.getLogger(__name__)

_keep = False


def start(settings: Settings) -> None:
    """Run in the child as it starts, before anything imports torch."""
    global _keep
    cpu_budget.configure(settings)  # its thread variables must be set before torch loads
    disable_progress_bars()  # a forked child inherits it; set again in case a library was imported since
    compile_cache.configure(settings.volume)
    _keep = settings.keep_base_model and recycle.install(RECYCLE_THRESHOLD_KB)
    if settings.keep_base_model and not _keep:
        log.warning("this billiard cannot replace a child on request: the base model is not kept between jobs")


def resident() -> ResidentBase | None:
    """The base model cache a job's run uses, or None when each job loads its own."""
    if not _keep:
        return None
    from worker.training.resident import process_resident

    return process_resident()


def after_job(settings: Settings) -> None:
    """Free what the job left; have this child replaced when memory is held beyond the resident base."""
    if not _keep:
        return
    from worker.training.resident import process_resident

    reason = process_resident().settle(max_rss_growth_bytes=int(settings.max_rss_growth_mb * 2**20))
    if reason is not None:
        recycle.request(reason)
