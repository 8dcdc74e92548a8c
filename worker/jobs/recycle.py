"""Replacing this pool child after its current task, when a job left it holding more than it should.

Celery's prefork pool (billiard) can end a child between tasks on its own terms only: after
`worker_max_tasks_per_child` tasks, or when the child's memory is past `worker_max_memory_per_child`.
A child that keeps the base model loaded between jobs (`worker.training.resident`) must also go when a
job leaked device memory or grew the host's past the bound, and that must happen *after* the task's
result reached the parent (so the message is acknowledged, not redelivered as lost) and *before* the
child takes the next job. billiard's memory check sits exactly there: it reads the child's memory after
each reported result. `install` wraps that reading so that, once `request` was called, the child reports
itself past the threshold (`shared.celery_factory.RECYCLE_THRESHOLD_KB`) and billiard replaces it with a
fresh one, as it would for a child over the memory limit (exit code EX_RECYCLE: no error logged).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

_requested: str | None = None


def request(reason: str) -> None:
    """End this child once the current task's result is reported (`install` must have run in it)."""
    global _requested
    if _requested is None:
        log.warning("this worker process will be replaced after its job: %s", reason)
    _requested = reason


def requested() -> str | None:
    return _requested


def install(threshold_kb: int) -> bool:
    """Make billiard's after-task memory check see `threshold_kb` + 1 once a recycle was requested.
    False (nothing installed) where this billiard has no such check."""
    import billiard.pool

    real: Callable[[], int] | None = getattr(billiard.pool, "mem_rss", None)
    if real is None or getattr(real, "_lora_recycle", False):
        return real is not None

    def mem_rss() -> int:
        used = real()
        return max(used, threshold_kb + 1) if _requested is not None else used

    mem_rss._lora_recycle = True  # type: ignore[attr-defined]
    billiard.pool.mem_rss = mem_rss  # type: ignore[attr-defined]  # read from the module at each check
    return True
