"""No restart loses a job: a worker asked to stop hands its job back, a killed one's job resumes, a run
that finished but could not record it is recorded and not run again, and saved state goes with its job."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from launcher.embedded_redis import EmbeddedRedis
from shared import keys
from shared.outputs import OUTPUT_MARKER
from tests.service import Service, running_events, submit, submit_long, wait_running, wait_until


def _events(svc: Service, job_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = svc.get(f"/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    return events


def _resumed_steps(events: list[dict[str, Any]]) -> list[int]:
    return [int(e["data"]["resumed_step"]) for e in events if e["message"].startswith("resuming from step")]


def _handed_back_at(events: list[dict[str, Any]]) -> list[int]:
    marker = "handed back at step "
    return [int(e["message"].split(marker)[1].split("/")[0]) for e in events if marker in e["message"]]


def _state(svc: Service, job_id: str) -> Path:
    return svc.base_path / ".state" / job_id


@pytest.mark.parametrize("signalled", ["group", "main"])
def test_a_worker_asked_to_stop_hands_its_job_back_first_in_line_and_it_resumes_there(
    make_service: type[Service], tiny_model_dir: Path, signalled: str
) -> None:
    """SIGTERM to the worker's process group (the launcher, Ctrl+C) or to its main process alone
    (`docker stop`): the job saves its state, goes back to the queue ahead of the one waiting, and the
    next worker continues it from the step it stopped at."""
    svc = make_service()
    job_id = submit_long(svc, tiny_model_dir, epochs=40)  # 160 steps
    waiting = svc.post("/train?queue=true", files={"config": (None, json.dumps({
        "model_name": str(tiny_model_dir), "epochs": 1})), "file": ("d.jsonl", b'{"messages": [{"role": "user", '
        b'"content": "hi"}, {"role": "assistant", "content": "hello"}]}\n')})  # fmt: skip
    assert waiting.status_code == 202, waiting.text
    waiting_id = waiting.json()["job_id"]
    wait_running(svc, job_id, min_step=10)
    assert svc.worker is not None
    if signalled == "group":
        os.killpg(svc.worker.pid, signal.SIGTERM)
    else:
        os.kill(svc.worker.pid, signal.SIGTERM)
    assert svc.worker.wait(timeout=60) == 0

    job = svc.job(job_id)
    assert job["status"] == "queued" and job["attempts"] == 0, job  # a stop on request uses no attempt
    (step,) = _handed_back_at(_events(svc, job_id))
    assert step >= 10 and _state(svc, job_id).is_dir()
    status = svc.get("/status").json()
    # First in line: it took the free slot ahead of the job that was already waiting.
    assert (status["status"], status["job_id"], status["job_status"]) == ("training", job_id, "queued"), status
    log = (svc.log_dir / "worker.log").read_text()
    assert "Traceback" not in log and "WorkerLostError" not in log, log[-4000:]
    assert svc.job(waiting_id)["status"] == "queued"

    svc.start_worker()
    done = svc.wait_for(job_id, {"succeeded", "failed", "cancelled"}, timeout=240)
    assert done["status"] == "succeeded" and done["attempts"] == 1, done
    assert _resumed_steps(_events(svc, job_id)) == [step]
    assert not _state(svc, job_id).exists()  # recorded, then dropped
    after = svc.wait_for(waiting_id, {"succeeded", "failed"}, timeout=120)
    assert after["status"] == "succeeded" and after["started_at"] >= done["finished_at"]


def test_a_worker_killed_without_warning_has_its_job_resumed_by_default(
    make_service: type[Service], tiny_model_dir: Path
) -> None:
    """SIGKILL to the worker and its child, with the default attempts: the lease lapses, the job is queued
    again and continues from its last saved state."""
    svc = make_service(LORA_STATE_EVERY_STEPS="5")  # type: ignore[call-arg]
    job_id = submit_long(svc, tiny_model_dir, epochs=40)
    at_kill = wait_running(svc, job_id, min_step=12)["progress"]["current_step"]
    svc.kill_worker_tree()
    assert svc.wait_for(job_id, {"queued", "failed"}, timeout=30)["status"] == "queued"
    svc.start_worker()
    done = svc.wait_for(job_id, {"succeeded", "failed", "cancelled"}, timeout=240)
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    events = _events(svc, job_id)
    assert any("lost; job queued for attempt 2" in e["message"] for e in events)
    (resumed,) = _resumed_steps(events)
    assert resumed >= 5 and len(running_events(svc, job_id)) == 2, (resumed, at_kill)


def test_redis_stalled_past_the_lease_as_a_job_ends_leaves_one_adapter_and_no_retraining(
    make_service: type[Service], tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Redis frozen (SIGSTOP) for longer than the lease while a short job finishes: whichever side
    settles the job once Redis is back, it is recorded as succeeded with the adapter it saved; it is never
    run again from step 1."""
    server = EmbeddedRedis(tmp_path / "redis-stall", persist=True).start()
    assert server.proc is not None
    try:
        svc = make_service(redis_url=server.url, LORA_LEASE_TTL_S="4")  # type: ignore[call-arg]
        r = submit(svc, tiny_model_dir, epochs=15, batch_size=2)  # 60 steps: seconds
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        wait_running(svc, job_id, min_step=2)
        os.kill(server.proc.pid, signal.SIGSTOP)
        time.sleep(10)  # the 4 s lease lapses meanwhile
        os.kill(server.proc.pid, signal.SIGCONT)
        done = svc.wait_for(job_id, {"succeeded", "failed", "cancelled"}, timeout=180)
        assert done["status"] == "succeeded", done
        events = _events(svc, job_id)
        runs = running_events(svc, job_id)
        # Either no second run at all, or one that continued from the stopped run's state.
        assert len(runs) == 1 or (len(runs) == 2 and all(s > 0 for s in _resumed_steps(events))), [
            e["message"] for e in events if e["type"] != "metrics"
        ]
        adapter = Path(done["model_path"])
        marker = json.loads((adapter / OUTPUT_MARKER).read_text())
        assert marker["kind"] == "adapter" and marker["job"] == job_id
        assert not [p.name for p in adapter.parent.iterdir() if p.name.startswith(f".{adapter.name}.")]
        wait_until(lambda: not _state(svc, job_id).exists(), timeout=20, what="the saved state to go")
    finally:
        if server.proc is not None and server.proc.poll() is None:
            os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()


def test_a_cancelled_paused_jobs_saved_state_is_removed(service: Service, tiny_model_dir: Path) -> None:
    job_id = submit_long(service, tiny_model_dir)
    wait_running(service, job_id, min_step=3)
    assert service.post(f"/jobs/{job_id}/pause").status_code in (200, 202)
    service.wait_for(job_id, {"paused"}, timeout=60)
    assert _state(service, job_id).is_dir()  # a paused job can still resume: its state stays
    assert service.get("/status").json()["status"] == "paused"
    assert service.post(f"/jobs/{job_id}/cancel").status_code == 200
    wait_until(lambda: not _state(service, job_id).exists(), timeout=20, what="the cancelled job's state to go")


def test_a_job_whose_complete_adapter_a_run_saved_is_recorded_as_succeeded_by_the_next_run(
    service: Service, tiny_model_dir: Path
) -> None:
    """A run saved the adapter but never recorded it (its lease lapsed where no reaper sees its disk): the
    next run of the job finds the adapter, marked with the job's id, and records it without training."""
    first = submit(service, tiny_model_dir)
    assert first.status_code == 202, first.text
    trained = service.wait_for(first.json()["job_id"], {"succeeded", "failed"})
    assert trained["status"] == "succeeded", trained
    service.stop_worker()
    service.slot_elsewhere()  # the slot admission counts: a worker elsewhere that has not taken the job yet
    second = submit(service, tiny_model_dir)
    assert second.status_code == 202, second.text
    job_id = second.json()["job_id"]
    with redis.Redis.from_url(service.redis_url, decode_responses=True) as client:
        output = Path(str(client.hget(keys.job_key(job_id), "output_dir")))
    # What the lost run left: a real adapter, swapped into place whole, its marker naming this job.
    shutil.copytree(trained["model_path"], output)
    marker = json.loads((output / OUTPUT_MARKER).read_text())
    (output / OUTPUT_MARKER).write_text(json.dumps({**marker, "job": job_id}))

    service.start_worker()
    done = service.wait_for(job_id, {"succeeded", "failed"}, timeout=120)
    assert done["status"] == "succeeded" and Path(done["model_path"]) == output, done
    assert done["metrics"]["steps"] == trained["metrics"]["steps"]  # the saved run's own summary
    messages = [e["message"] for e in _events(service, job_id)]
    assert any("recorded as succeeded, without training again" in m for m in messages), messages
    assert not any(m.startswith("training ") for m in messages), messages
