"""Faults with real processes: killed workers, restarted API and Redis, redelivery, cancel, races."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from launcher.embedded_redis import EmbeddedRedis
from tests.data import easy_records, jsonl
from tests.integration.process_tree import alive, children
from tests.service import Service, running_events, submit, submit_long, wait_running, wait_until


def test_worker_killed_past_its_last_attempt_fails_the_job_and_frees_the_slot(
    make_service: type[Service], tiny_model_dir: Path
) -> None:
    service = make_service(LORA_MAX_ATTEMPTS="1")  # type: ignore[call-arg]
    job_id = submit_long(service, tiny_model_dir)
    wait_running(service, job_id)
    service.kill_worker_tree()
    t0 = time.monotonic()
    job = service.wait_for(job_id, {"failed", "succeeded", "cancelled"}, timeout=60)
    assert job["status"] == "failed" and "worker lost" in job["error"]
    assert time.monotonic() - t0 < 30  # lease 4 s here; about two minutes with the default 60 s
    status = service.get("/status").json()
    assert status["status"] == "error" and "worker lost" in status["error"]
    service.start_worker()
    r = submit(service, tiny_model_dir)
    assert r.status_code == 202, r.text
    assert service.wait_for(r.json()["job_id"], {"succeeded", "failed"})["status"] == "succeeded"


def test_killed_child_is_redelivered_and_the_duplicate_refused(
    make_service: type[Service], tiny_model_dir: Path
) -> None:
    """SIGKILL the pool child only: Celery requeues the message, the lease check refuses it."""
    service = make_service(LORA_MAX_ATTEMPTS="1")  # type: ignore[call-arg]
    job_id = submit_long(service, tiny_model_dir)
    wait_running(service, job_id)
    assert service.worker is not None
    (child,) = children(service.worker.pid)
    os.kill(child, signal.SIGKILL)
    job = service.wait_for(job_id, {"failed", "succeeded"}, timeout=60)
    assert job["status"] == "failed" and "worker lost" in job["error"]
    assert len(running_events(service, job_id)) == 1  # never a second runner
    service.wait_for_log(f"not running job {job_id}: it is", timeout=20)


def test_attempt_budget_runs_a_lost_job_once_more(make_service: type[Service], tiny_model_dir: Path) -> None:
    svc = make_service(LORA_MAX_ATTEMPTS="2")  # type: ignore[call-arg]
    job_id = submit_long(svc, tiny_model_dir, epochs=10)
    wait_running(svc, job_id)
    svc.kill_worker_tree()
    svc.wait_for(job_id, {"queued"}, timeout=30)
    svc.start_worker()
    job = svc.wait_for(job_id, {"succeeded", "failed"}, timeout=180)
    assert job["status"] == "succeeded" and job["attempts"] == 2
    assert len(running_events(svc, job_id)) == 2


def test_cancel_running_job_stops_it_and_frees_the_slot(service: Service, tiny_model_dir: Path) -> None:
    job_id = submit_long(service, tiny_model_dir)
    running = wait_running(service, job_id, min_step=3)
    assert service.worker is not None
    (child,) = children(service.worker.pid)
    live = service.get("/status").json()  # the worker's GPU memory while it runs, as the seed reported it
    assert live["job_status"] == "running" and (live["allocated_gpu_memory"], live["reserved_gpu_memory"]) == (0.0, 0.0)
    r = service.post(f"/jobs/{job_id}/cancel")
    assert r.status_code == 202 and r.json()["status"] == "cancelling"
    job = service.wait_for(job_id, {"cancelled", "failed", "succeeded"}, timeout=30)
    assert job["status"] == "cancelled"
    assert job["progress"]["current_step"] < running["progress"]["total_steps"]
    status = service.get("/status").json()
    assert status["status"] == "error" and "cancel" in status["message"].lower()
    assert "allocated_gpu_memory" not in status  # only while a job runs
    assert service.post(f"/jobs/{job_id}/cancel").status_code == 409
    assert service.post("/jobs/job-unknown/cancel").status_code == 404
    # The child that held the model stays, with the base model taken back clean: the next job reuses it.
    r = submit(service, tiny_model_dir)
    assert r.status_code == 202, r.text
    assert service.wait_for(r.json()["job_id"], {"succeeded", "failed"})["status"] == "succeeded"
    events = service.get(f"/jobs/{r.json()['job_id']}/events", params={"limit": 1000}).json()["data"]
    assert [e["data"]["base_model"] for e in events if "base_model" in e["data"]] == ["reused"]
    assert alive(child) and children(service.worker.pid) == [child]


def test_without_keep_base_model_a_cancelled_jobs_child_exits(
    make_service: type[Service], tiny_model_dir: Path
) -> None:
    svc = make_service(LORA_KEEP_BASE_MODEL="false")  # type: ignore[call-arg]
    job_id = submit_long(svc, tiny_model_dir)
    wait_running(svc, job_id, min_step=3)
    assert svc.worker is not None
    (child,) = children(svc.worker.pid)
    assert svc.post(f"/jobs/{job_id}/cancel").status_code == 202
    assert svc.wait_for(job_id, {"cancelled", "failed", "succeeded"}, timeout=30)["status"] == "cancelled"
    # One task per child: the process that held the model is gone.
    wait_until(lambda: not alive(child), timeout=20, what=f"the pool child {child} to exit")
    assert submit(svc, tiny_model_dir).status_code == 202


def test_cancel_queued_job_removes_it_before_it_starts(service: Service, tiny_model_dir: Path) -> None:
    service.stop_worker()
    service.slot_elsewhere()  # the slot admission counts: a worker elsewhere that has not taken the job yet
    r = submit(service, tiny_model_dir)
    job_id = r.json()["job_id"]
    assert service.get(f"/jobs/{job_id}").json()["status"] == "queued"
    assert service.post("/cancel").status_code == 200
    assert service.get(f"/jobs/{job_id}").json()["status"] == "cancelled"
    service.start_worker()
    service.wait_for_log(f"not running job {job_id}: it is cancelled", timeout=30)
    assert service.get(f"/jobs/{job_id}").json()["attempts"] == 0


def test_api_restart_mid_job_loses_nothing(service: Service, tiny_model_dir: Path) -> None:
    job_id = submit_long(service, tiny_model_dir, epochs=25)
    wait_running(service, job_id)
    before_job = service.get(f"/jobs/{job_id}").json()
    before_status = service.get("/status").json()
    service.stop_api()
    service.start_api()
    after_job = service.get(f"/jobs/{job_id}").json()
    after_status = service.get("/status").json()
    for key in ("id", "status", "config", "created_at", "started_at", "attempts", "worker"):
        assert after_job[key] == before_job[key], key
    assert after_job["progress"]["current_step"] >= before_job["progress"]["current_step"]
    assert {k: after_status[k] for k in ("status", "job_id", "total_steps")} == {
        k: before_status[k] for k in ("status", "job_id", "total_steps")
    }
    assert service.wait_for(job_id, {"succeeded", "failed"})["status"] == "succeeded"


@pytest.mark.parametrize("outage_s", [1.0, 6.0])
def test_redis_restart_mid_job_never_runs_it_twice(
    make_service: type[Service], tiny_model_dir: Path, tmp_path: Path, outage_s: float
) -> None:
    """Short outage (under half the 8 s lease): the job rides it out. Long one: the job stops itself,
    saves its state and goes back to the queue, and continues from there once Redis is back."""
    server = EmbeddedRedis(tmp_path / "redis-restart", persist=True).start()
    try:
        svc = make_service(redis_url=server.url, LORA_LEASE_TTL_S="8")  # type: ignore[call-arg]
        job_id = submit_long(svc, tiny_model_dir, epochs=40 if outage_s < 4 else 150)
        wait_running(svc, job_id)
        server.stop()
        r = svc.get("/status")
        assert r.status_code == 503 and "Redis" in r.json()["detail"]
        r = svc.post("/train", files={"file": ("d.jsonl", jsonl(easy_records(2)))})
        assert r.status_code == 503 and "Redis" in r.json()["detail"]
        time.sleep(outage_s)
        server.start()
        job = svc.wait_for(job_id, {"failed", "succeeded", "cancelled"}, timeout=240)
        assert job["status"] == "succeeded", job
        if outage_s < 4:
            assert len(running_events(svc, job_id)) == 1
        else:
            events = svc.get(f"/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
            handed = [e for e in events if "lost contact with Redis: handed back at step" in e["message"]]
            resumed = [e for e in events if e["message"].startswith("resuming from step")]
            # It continues from the state saved as it stopped (or, had the reaper requeued it first, from the
            # same state: the stopped run could not hand it back, but its state was written all the same).
            assert len(resumed) == 1 and resumed[0]["data"]["resumed_step"] > 0, [e["message"] for e in events]
            for event in handed:
                step = int(event["message"].split("handed back at step ")[1].split("/")[0])
                assert resumed[0]["data"]["resumed_step"] == step  # not a step lost, none trained twice
        # Both sides reconnect by themselves: a new job runs to the end.
        r = wait_until(
            lambda: (reply := submit(svc, tiny_model_dir)).status_code == 202 and reply,
            timeout=60,
            every=1,
            what="a submission to be accepted again",
        )
        assert svc.wait_for(r.json()["job_id"], {"succeeded", "failed"}, timeout=120)["status"] == "succeeded"
    finally:
        server.stop()


def test_redelivery_after_visibility_timeout_is_refused(make_service: type[Service], tiny_model_dir: Path) -> None:
    svc = make_service(LORA_VISIBILITY_TIMEOUT_S="2")  # type: ignore[call-arg]
    svc.start_worker()  # a second, idle worker to receive the redelivered message
    job_id = submit_long(svc, tiny_model_dir, epochs=15)
    wait_running(svc, job_id)
    svc.wait_for_log(f"not running job {job_id}: it is running", timeout=60)
    job = svc.wait_for(job_id, {"succeeded", "failed"}, timeout=180)
    assert job["status"] == "succeeded" and job["attempts"] == 1
    assert len(running_events(svc, job_id)) == 1


def test_fifty_simultaneous_submits_admit_one_per_round(service: Service, tiny_model_dir: Path) -> None:
    service.stop_worker()  # admitted jobs stay queued, so each round's cancel frees the slot at once
    service.slot_elsewhere()  # the slot admission counts: a worker elsewhere that has not taken the job yet
    data = jsonl(easy_records(2))
    config = json.dumps({"epochs": 1, "model_name": str(tiny_model_dir)})
    for round_no in range(10):
        codes: list[int] = []
        ids: list[str] = []
        barrier = threading.Barrier(50)

        def post(client: httpx.Client, barrier: threading.Barrier = barrier, codes: list[int] = codes,
                 ids: list[str] = ids) -> None:  # fmt: skip
            barrier.wait()
            r = client.post("/train", files={"config": (None, config), "file": ("d.jsonl", data)})
            codes.append(r.status_code)
            if r.status_code == 202:
                ids.append(r.json()["job_id"])

        with httpx.Client(base_url=service.url, timeout=60, limits=httpx.Limits(max_connections=60)) as client:
            threads = [threading.Thread(target=post, args=(client,)) for _ in range(50)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert codes.count(202) == 1 and codes.count(409) == 49, (round_no, sorted(codes))
        assert service.post(f"/jobs/{ids[0]}/cancel").status_code == 200
    assert len(service.get("/jobs", params={"status": "cancelled", "limit": 100}).json()["data"]) == 10


def test_api_key_guards_every_endpoint_but_the_probes(make_service: type[Service]) -> None:
    svc = make_service(LORA_API_KEY="s3cret")  # type: ignore[call-arg]
    assert svc.get("/healthz").status_code == 200
    for path in ("/status", "/jobs", "/metrics", "/openapi.json"):
        r = svc.get(path)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), path
        assert svc.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert svc.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200, path
    r = svc.post("/train", files={"file": ("d.jsonl", jsonl(easy_records(2)))})
    assert r.status_code == 401
    assert not list((svc.base_path / "datasets").glob("*.jsonl"))
