"""The job store's transitions against a real Redis-compatible server."""

import threading
import time

import redis

from shared import keys
from shared.config import TrainConfig
from shared.events import StatusChanged
from shared.jobs import JobRecord, JobStatus, Progress
from shared.store import JobStore


def _record(job_id: str) -> JobRecord:
    return JobRecord(
        id=job_id, status=JobStatus.queued, created_at=0, config=TrainConfig(epochs=1),
        dataset_path="/d.jsonl", output_dir="/o", max_attempts=1,
    )  # fmt: skip


def _admitted(store: JobStore, job_id: str, slots: int = 1) -> bool:
    return store.admit(_record(job_id), max_slots=slots, queue_timeout_s=60).admitted


def test_admission_is_atomic_under_concurrency(redis_client: redis.Redis, redis_url: str) -> None:
    results: list[bool] = []
    barrier = threading.Barrier(30)

    def submit(i: int) -> None:
        store = JobStore(redis.Redis.from_url(redis_url, decode_responses=True))
        barrier.wait()
        results.append(_admitted(store, f"j{i}", slots=2))

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 2
    assert redis_client.zcard(keys.ACTIVE) == 2


def test_refused_admission_names_the_running_job(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client)
    assert _admitted(store, "a")
    result = store.admit(_record("b"), max_slots=1, queue_timeout_s=60)
    assert not result.admitted and result.running == ["a"]
    assert store.get("b") is None


def test_claim_renew_finish_and_fencing(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client)
    assert _admitted(store, "a")
    assert store.claim("a", token="t1", lease_s=30, worker="w1") == "ok"
    # A redelivered message finds the job running and is refused.
    assert store.claim("a", token="t2", lease_s=30, worker="w2") == "running"
    assert store.renew("a", token="t1", lease_s=30, progress=Progress(current_step=3, total_steps=9)) == 0
    assert store.renew("a", token="t2", lease_s=30, progress=None) == -1
    rec = store.get("a")
    assert rec is not None and rec.status is JobStatus.running and rec.progress.current_step == 3
    assert rec.attempts == 1
    assert not store.finish("a", token="t2", status=JobStatus.succeeded, message="x")
    assert store.finish("a", token="t1", status=JobStatus.succeeded, message="done", model_path="/o")
    rec = store.get("a")
    assert rec is not None and rec.status is JobStatus.succeeded and rec.model_path == "/o"
    assert store.active_ids() == []
    assert store.claim("a", token="t3", lease_s=30, worker="w3") == "succeeded"
    changes = [e.data for e in store.events("a") if e.type == "status"]
    assert changes == [StatusChanged(status=s) for s in (JobStatus.queued, JobStatus.running, JobStatus.succeeded)]


def test_cancel_queued_and_running(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client)
    assert _admitted(store, "q")
    assert store.cancel("q") == "removed"
    assert store.cancel("q") == "cancelled"
    assert store.active_ids() == []
    assert store.claim("q", token="t", lease_s=30, worker="w") == "cancelled"
    assert _admitted(store, "r")
    store.claim("r", token="t", lease_s=30, worker="w")
    assert store.cancel("r") == "requested"
    assert store.renew("r", token="t", lease_s=30, progress=None) == 1
    assert store.cancel("missing") == "missing"


def test_lapsed_lease_fails_the_job_and_frees_the_slot(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client)
    assert _admitted(store, "a")
    store.claim("a", token="t", lease_s=0.2, worker="w1")
    assert store.reap(queue_timeout_s=60) == []
    assert store.get("a").status is JobStatus.running  # type: ignore[union-attr]
    time.sleep(0.3)
    assert store.reap(queue_timeout_s=60) == []
    rec = store.get("a")
    assert rec is not None and rec.status is JobStatus.failed and rec.error and "worker lost" in rec.error
    assert store.active_ids() == []
    assert store.renew("a", token="t", lease_s=30, progress=None) == -1


def test_lapsed_lease_requeues_while_attempts_remain(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client)
    rec = _record("a").model_copy(update={"max_attempts": 2})
    assert store.admit(rec, max_slots=1, queue_timeout_s=60).admitted
    store.claim("a", token="t", lease_s=0.1, worker="w1")
    time.sleep(0.2)
    assert store.reap(queue_timeout_s=60) == ["a"]
    assert store.get("a").status is JobStatus.queued  # type: ignore[union-attr]
    assert store.active_ids() == ["a"]
    assert store.claim("a", token="t2", lease_s=0.1, worker="w2") == "ok"
    time.sleep(0.2)
    assert store.reap(queue_timeout_s=60) == []
    final = store.get("a")
    assert final is not None and final.status is JobStatus.failed and final.attempts == 2


def test_queued_job_nobody_claims_fails_after_queue_timeout(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client)
    assert store.admit(_record("a"), max_slots=1, queue_timeout_s=0.1).admitted
    time.sleep(0.2)
    store.reap(queue_timeout_s=60)
    rec = store.get("a")
    assert rec is not None and rec.status is JobStatus.failed and "no worker" in (rec.error or "")
    assert _admitted(store, "b")


def test_current_prefers_active_then_newest(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client)
    assert store.current() is None
    assert _admitted(store, "a")
    store.claim("a", token="t", lease_s=30, worker="w")
    store.finish("a", token="t", status=JobStatus.failed, message="m", error="boom")
    assert store.current().id == "a"  # type: ignore[union-attr]
    assert _admitted(store, "b")
    assert store.current().id == "b"  # type: ignore[union-attr]


def test_prune_drops_only_ended_jobs_past_retention(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client)
    assert _admitted(store, "old", slots=5) and _admitted(store, "running", slots=5)
    store.claim("old", token="t", lease_s=30, worker="w")
    store.finish("old", token="t", status=JobStatus.succeeded, message="done")
    store.claim("running", token="t", lease_s=30, worker="w")
    time.sleep(0.05)
    assert store.prune(older_than_s=3600) == []
    assert store.prune(older_than_s=0.01) == ["old"]
    assert store.get("old") is None and store.events("old") == []
    assert store.get("running") is not None
    assert [job_id for job_id, _ in store.list_ids()] == ["running"]


def test_foreign_ids_never_reach_redis_keys(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client)
    assert _admitted(store, "a")
    assert store.get("a:events") is None and store.cancel("a:events") == "missing"
    assert store.events("a:events") == [] and store.get("../a") is None


def test_a_pause_goes_through_pausing_to_paused_unless_a_cancel_came_meanwhile(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client)
    for job_id in ("p", "c"):
        assert _admitted(store, job_id, slots=2)
        assert store.claim(job_id, token="t", lease_s=30, worker="w") == "ok"
        assert store.pause(job_id) == "pausing"
        assert store.renew(job_id, token="t", lease_s=30, progress=None) == 2  # the worker is told to pause
    # A cancel while it pauses wins: the worker's "paused" is recorded as cancelled, and its webhook is due.
    assert store.cancel("c") == "requested"
    assert store.finish("p", token="t", status=JobStatus.paused, message="paused") is JobStatus.paused
    assert store.finish("c", token="t", status=JobStatus.paused, message="paused") is JobStatus.cancelled
    paused, cancelled = store.get("p"), store.get("c")
    assert paused is not None and paused.status is JobStatus.paused and paused.finished_at is None
    assert cancelled is not None and cancelled.status is JobStatus.cancelled and cancelled.finished_at is not None
    assert store.active_ids() == []
    outbox = [e for e in redis_client.lrange(keys.WEBHOOK_OUTBOX, 0, -1)]  # type: ignore[union-attr]
    assert len(outbox) == 1 and '"job_id":"c"' in outbox[0] and '"status":"cancelled"' in outbox[0]


def test_a_job_whose_task_could_not_be_published_leaves_the_waiting_line(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client)
    assert _admitted(store, "a")
    waiting = store.admit(_record("b"), max_slots=1, queue_timeout_s=60, max_waiting=5)
    assert waiting.waiting == 1 and store.waiting_ids() == ["b"]
    assert store.abort("b", "could not enqueue the job: broker down")
    assert store.waiting_ids() == [] and store.promote(max_slots=2, queue_timeout_s=60) == []


def test_a_job_that_stops_running_keeps_its_figures_but_no_eta(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client)
    live = Progress(current_step=4, total_steps=9, loss=1.2345678901234567, eta_seconds=151.8)

    def running(job_id: str, **update: object) -> None:
        assert store.admit(_record(job_id).model_copy(update=update), max_slots=9, queue_timeout_s=60).admitted
        assert store.claim(job_id, token="t", lease_s=30, worker="w") == "ok"
        assert store.renew(job_id, token="t", lease_s=30, progress=live) == 0
        assert store.get(job_id).progress.eta_seconds == 151.8  # type: ignore[union-attr]

    def progress(job_id: str) -> Progress:
        rec = store.get(job_id)
        assert rec is not None
        return rec.progress

    running("done")  # the worker's last progress, with its ETA, comes with the outcome
    store.finish("done", token="t", status=JobStatus.succeeded, message="ok", progress=live)
    running("failed")
    store.finish("failed", token="t", status=JobStatus.failed, message="x", error="boom")
    running("cancelled")
    assert store.cancel("cancelled") == "requested"
    store.finish("cancelled", token="t", status=JobStatus.cancelled, message="Cancelled")
    running("paused")
    assert store.pause("paused") == "pausing"
    store.finish("paused", token="t", status=JobStatus.paused, message="Paused", progress=live)
    running("lost", max_attempts=2)
    running("lost-for-good")
    redis_client.zadd(keys.ACTIVE, {"lost": 0, "lost-for-good": 0})  # their leases lapse
    assert store.reap(queue_timeout_s=60) == ["lost"]
    running("handed")  # last: a job handed back waits first in line, and the others would queue behind it
    store.hand_back("handed", token="t", reason="worker stopping", count_attempt=False, progress=live)
    expected = {"done": "succeeded", "failed": "failed", "cancelled": "cancelled", "paused": "paused",
                "handed": "queued", "lost": "queued", "lost-for-good": "failed"}  # fmt: skip
    for job_id, status in expected.items():
        assert store.get(job_id).status.value == status, job_id  # type: ignore[union-attr]
        p = progress(job_id)
        assert p.eta_seconds is None, job_id
        assert (p.current_step, p.total_steps, p.loss) == (4, 9, live.loss), job_id  # exact digits kept
