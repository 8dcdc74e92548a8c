"""A pool child that asks to be replaced is, after its task's result is reported (real billiard processes)."""

from __future__ import annotations

import os

from billiard.pool import Pool

from shared.celery_factory import RECYCLE_THRESHOLD_KB
from worker.jobs import recycle


def _start() -> None:
    assert recycle.install(RECYCLE_THRESHOLD_KB)


def _job(ask: bool) -> int:
    if ask:
        recycle.request("a test asked for it")
    return os.getpid()


def test_a_child_that_requests_it_is_replaced_after_its_task() -> None:
    pool = Pool(1, initializer=_start, max_memory_per_child=RECYCLE_THRESHOLD_KB)
    try:
        kept = pool.apply(_job, (False,))
        assert pool.apply(_job, (False,)) == kept  # no request: the same child keeps running
        asked = pool.apply(_job, (True,))  # its result still comes back
        assert asked == kept
        assert pool.apply(_job, (False,)) != kept  # the next task runs in a fresh child
    finally:
        pool.terminate()
        pool.join()


def test_install_wraps_the_check_billiard_runs_after_each_task() -> None:
    import inspect

    import billiard.pool

    # The hook relies on billiard reading `mem_rss` from its module after each task: a billiard that
    # stops doing so must fail here, not silently keep leaking children.
    assert "used_kb = mem_rss()" in inspect.getsource(billiard.pool.Worker.workloop)
