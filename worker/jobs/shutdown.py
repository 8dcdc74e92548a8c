"""A worker asked to stop (SIGTERM: a restart, a deploy, Ctrl+C on the launcher) hands its job back.

The pool child catches SIGTERM instead of dying mid-step: the running job saves its full training
state at the next step and goes back to the queue, first in line (`worker.jobs.runner`), and the
child then ends with the worker. The worker's main process passes the request on to its child, so a
SIGTERM to the main process alone (`docker stop`) does the same. An idle child just exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType

from worker.jobs import recycle

log = logging.getLogger(__name__)

requested = threading.Event()  # set once this child was asked to stop; the job's lease reads it


def _on_sigterm(signum: int, _frame: FrameType | None) -> None:
    if not requested.is_set():
        log.warning("this worker is stopping: the running job saves its state and goes back to the queue")
    requested.set()


@contextlib.contextmanager
def running_job() -> Iterator[None]:
    """While a job runs in this child, a SIGTERM hands it back instead of ending the child mid-step.

    Installed per job, not when the child starts: billiard installs its own exit handler after Celery's
    child initializer, and that handler is what an idle child should keep."""
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        if requested.is_set():  # honoured: the job went back to the queue
            # This child is done: it ends with its worker (the pool closes) or is replaced. It keeps this
            # handler: the same stop arrives twice (the group's signal, then the main process passing it on),
            # and billiard's would exit mid-cleanup with a traceback.
            requested.clear()  # a child asked alone (its worker stays up) runs a next job normally
            recycle.request("it was asked to stop")
        else:
            signal.signal(signal.SIGTERM, previous)


def forward_to_children() -> None:
    """In the worker's main process as its warm shutdown begins: ask the pool's children to stop too."""
    from billiard.process import active_children

    for child in active_children():
        if child.pid is not None:
            with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                os.kill(child.pid, signal.SIGTERM)
