"""The worker's lease keeper against a real Redis: renewal, progress, cancel, fencing, failures."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import pytest
import redis

from shared.config import TrainConfig
from shared.events import InfoNotice, info
from shared.jobs import JobRecord, JobStatus, Progress
from shared.metrics import StepMetrics
from shared.store import JobStore
from tests.service import wait_until
from worker.jobs.lease import LeaseKeeper


def _running(store: JobStore, job_id: str, token: str, lease_s: float) -> None:
    record = JobRecord(id=job_id, status=JobStatus.queued, created_at=0, config=TrainConfig(), dataset_path="d",
                       output_dir="o")  # fmt: skip
    assert store.admit(record, max_slots=5, queue_timeout_s=60).admitted
    assert store.claim(job_id, token=token, lease_s=lease_s, worker="w") == "ok"


def _until(predicate: Callable[[], bool]) -> bool:
    return wait_until(predicate, timeout=5.0, every=0.02, what="the lease keeper to stop the job")


def test_renews_the_lease_and_carries_progress_and_events(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client)
    _running(store, "a", "t", lease_s=0.6)
    with LeaseKeeper(store, "a", "t", lease_s=0.6) as lease:
        lease.publish(Progress(current_step=7, total_steps=10))
        lease.emit(StepMetrics(step=7, epoch=1, loss=1.5), "step 7")
        lease.emit(info(device="cpu"), "a notice with free-form details")
        time.sleep(1.5)  # well past the lease: only renewal keeps it
        assert store.reap(queue_timeout_s=60) == [] and store.get("a").status is JobStatus.running  # type: ignore[union-attr]
        assert not lease.should_stop()
    assert store.get("a").progress.current_step == 7  # type: ignore[union-attr]
    events = store.events("a")
    assert [e.data for e in events if e.type == "metrics"] == [StepMetrics(step=7, epoch=1, loss=1.5)]
    (notice,) = [e.data for e in events if e.type == "info"]
    assert isinstance(notice, InfoNotice) and notice.model_dump() == {"device": "cpu"}


def test_cancel_and_fencing_stop_the_loop(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client)
    _running(store, "a", "t", lease_s=30)
    with LeaseKeeper(store, "a", "t", lease_s=30) as lease:
        store.cancel("a")
        assert _until(lease.should_stop) and lease.cancelled.is_set()
    _running(store, "b", "t", lease_s=30)
    with LeaseKeeper(store, "b", "other-token", lease_s=30) as lease:
        assert _until(lease.should_stop) and lease.fenced.is_set()


class _Broken(JobStore):
    def renew(self, *args: object, **kwargs: object) -> int:
        raise ValueError("not JSON-serialisable, say")


class _Unreachable(JobStore):
    def renew(self, *args: object, **kwargs: object) -> int:
        raise redis.ConnectionError("connection refused")


def test_a_failed_lease_thread_stops_the_job(redis_client: redis.Redis) -> None:
    store = _Broken(redis_client)
    _running(store, "a", "t", lease_s=30)
    with LeaseKeeper(store, "a", "t", lease_s=30) as lease:
        assert _until(lease.should_stop) and lease.lost.is_set()


def test_redis_gone_for_half_the_lease_stops_the_job(redis_client: redis.Redis) -> None:
    store = _Unreachable(redis_client)
    _running(store, "a", "t", lease_s=1.0)
    with LeaseKeeper(store, "a", "t", lease_s=1.0) as lease:
        started = time.monotonic()
        assert _until(lease.should_stop) and lease.lost.is_set()
        assert time.monotonic() - started < 1.0  # before the server-side lease could lapse


def test_a_recorded_outcome_ends_the_lease_quietly_and_a_lost_lease_still_warns(
    redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    store = JobStore(redis_client)
    _running(store, "a", "t", lease_s=0.6)
    with caplog.at_level(logging.DEBUG, logger="worker.jobs.lease"):
        with LeaseKeeper(store, "a", "t", lease_s=0.6) as lease:
            lease.recording_outcome()
            assert store.finish("a", token="t", status=JobStatus.succeeded, message="done") is JobStatus.succeeded
            time.sleep(1.0)  # several renewal rounds after the job ended
            lease.emit(info(after="recorded"), "an event after the outcome still reaches the stream")
        assert not lease.fenced.is_set()
        assert [r.levelname for r in caplog.records] == ["DEBUG"], caplog.text
        assert any(e.message.startswith("an event after the outcome") for e in store.events("a"))
        caplog.clear()
        _running(store, "b", "t", lease_s=30)
        with LeaseKeeper(store, "b", "other-token", lease_s=30) as lease:  # another runner's lease
            assert _until(lease.should_stop) and lease.fenced.is_set()
        assert [r.levelname for r in caplog.records] == ["WARNING"], caplog.text


def test_the_runs_status_line_becomes_the_jobs_message_but_never_over_a_cancel(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client)
    _running(store, "a", "t", lease_s=30)
    with LeaseKeeper(store, "a", "t", lease_s=30) as lease:
        lease.status("Loading model /models/tiny...")
        assert _until(lambda: store.get("a").message == "Loading model /models/tiny...")  # type: ignore[union-attr]
        store.cancel("a")
        assert _until(lease.should_stop)
        lease.status("Training...")
        time.sleep(0.5)
    assert store.get("a").message == "Cancelling..."  # type: ignore[union-attr]
