"""Holding a job's lease while it trains, and carrying progress and events to Redis.

A background thread renews the lease (fencing: it stops the moment another runner owns the
job), stores the latest progress, appends events, and notices cancellation. The training loop
never talks to Redis itself: it hands progress over and asks `should_stop()`, so a slow or
unreachable Redis never stalls a step.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from types import TracebackType

import redis

from shared.events import EventPayload
from shared.jobs import Progress
from shared.store import JobStore
from worker.jobs import shutdown

log = logging.getLogger(__name__)


class LeaseKeeper:
    def __init__(self, store: JobStore, job_id: str, token: str, lease_s: float) -> None:
        self.store, self.job_id, self.token, self.lease_s = store, job_id, token, lease_s
        self.cancelled = threading.Event()  # a cancel was requested
        self.paused = threading.Event()  # a pause was requested: save the full state and stop
        self.fenced = threading.Event()  # another runner owns the job now (or it was settled)
        # The runner is recording the job's outcome: a refused renewal then means it is recorded, the
        # ordinary end of every job, not a lease lost (the runner itself says when someone else settled it).
        self.recording = threading.Event()
        self.lost = threading.Event()  # Redis unreachable for longer than the lease
        # This worker was asked to stop (SIGTERM: a restart or a deploy): save the state, hand the job back.
        self.shutdown = shutdown.requested
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._progress: Progress | None = None
        self._message: str | None = None  # what the run is doing now, written with the next renewal
        self._events: queue.Queue[tuple[EventPayload, str]] = queue.Queue()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)
        self._interval = min(1.0, lease_s / 3)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    # Called from the training loop.
    def pause_requested(self) -> bool:
        """The stop keeps the job going later (a pause, this worker stopping, Redis lost): the run saves
        its full state before it ends, and the job continues from it."""
        # A cancel needs no state; a runner fenced out (another owns the job now) saves nothing: the state
        # folder is the new owner's.
        if self.cancelled.is_set() or self.fenced.is_set():
            return False
        return self.paused.is_set() or self.shutdown.is_set() or self.lost.is_set()

    @property
    def handing_back(self) -> bool:
        """The run stopped for a reason that is not the job's: it goes back to the queue, first in line."""
        return not self.paused.is_set() and (self.shutdown.is_set() or self.lost.is_set())

    def publish(self, progress: Progress) -> None:
        with self._lock:
            self._progress = progress
        self._wake.set()

    def status(self, message: str) -> None:
        with self._lock:
            self._message = message
        self._wake.set()

    def emit(self, event: EventPayload, message: str) -> None:
        """Append an event to the job's stream (its type is the payload's: see shared.events)."""
        self._events.put((event, message))
        self._wake.set()

    def recording_outcome(self) -> None:
        """Say the job's outcome is being recorded: its lease ends with it, quietly."""
        self.recording.set()

    def should_stop(self) -> bool:
        if self.cancelled.is_set() or self.paused.is_set() or self.fenced.is_set() or self.lost.is_set():
            return True
        if self.shutdown.is_set():
            return True
        # A dead lease thread renews nothing: the job must not train on unobserved.
        return self._thread.ident is not None and not self._thread.is_alive() and not self._stop.is_set()

    @property
    def latest(self) -> Progress | None:
        with self._lock:
            return self._progress

    # The thread.
    def _run(self) -> None:
        try:
            self._loop()
        except Exception:
            log.exception("job %s: the lease thread failed; stopping the job", self.job_id)
            self.lost.set()

    def _loop(self) -> None:
        last_ok = time.monotonic()
        # Give up at half the lease: the server-side lease must not lapse (and the job be handed to
        # another worker) while this one still trains.
        give_up_after = self.lease_s / 2
        settled = False  # the runner recorded the outcome: only events are left to flush
        while True:
            self._wake.wait(self._interval)
            self._wake.clear()
            stopping = self._stop.is_set()
            with self._lock:
                progress, message = self._progress, self._message
            try:
                self._flush_events()
                if stopping:  # the outcome is recorded (or not this runner's): a renewal would only be refused
                    return
                if settled:
                    continue
                state = self.store.renew(
                    self.job_id, token=self.token, lease_s=self.lease_s, progress=progress, message=message
                )
                last_ok = time.monotonic()
                with self._lock:  # written: not again on every round (a newer one replaced it meanwhile)
                    if self._message == message:
                        self._message = None
                if state < 0 and self.recording.is_set():
                    log.debug("job %s: its outcome is recorded; the lease ends with it", self.job_id)
                    settled = True
                    continue
                if state < 0 and not self.fenced.is_set():
                    log.warning("job %s: lease lost to another runner or settled; stopping", self.job_id)
                    self.fenced.set()
                elif state == 1 and not self.cancelled.is_set():
                    log.info("job %s: cancel requested", self.job_id)
                    self.cancelled.set()
                elif state == 2 and not self.paused.is_set():
                    log.info("job %s: pause requested", self.job_id)
                    self.paused.set()
            except redis.RedisError as exc:
                if time.monotonic() - last_ok > give_up_after and not self.lost.is_set():
                    log.error("job %s: Redis unreachable for %.0f s (%s); stopping", self.job_id, give_up_after, exc)
                    self.lost.set()
            if stopping:
                return

    def _flush_events(self) -> None:
        while True:
            try:
                event, message = self._events.get_nowait()
            except queue.Empty:
                return
            try:
                self.store.add_event(self.job_id, event, message)
            except redis.RedisError:
                self._events.put((event, message))  # keep it for the next round
                raise
