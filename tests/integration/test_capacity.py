"""Capacity from the live workers: a worker started mid-run raises the slots, one that dies lowers them and its
job is resumed on another, and with no worker up /train says so while OpenAI jobs wait for one."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

from openai import OpenAI

from tests.data import easy_records, jsonl
from tests.service import Service, submit, submit_long, wait_running, wait_until


def _slots(service: Service) -> int:
    return int(service.health()["slots"])


def test_a_worker_started_mid_run_adds_its_slot_and_one_that_dies_takes_it_away(
    make_service: type[Service], tiny_model_dir: Path
) -> None:
    svc = make_service(LORA_STATE_EVERY_STEPS="5")  # type: ignore[call-arg]
    assert _slots(svc) == 1
    first = submit_long(svc, tiny_model_dir, epochs=150)
    wait_running(svc, first, min_step=1)
    full = submit(svc, tiny_model_dir)
    assert full.status_code == 409 and full.json()["running_jobs"] == [first], full.text

    svc.start_worker()  # a second worker: its slot counts as soon as it announces itself, nothing to configure
    health = svc.health()
    assert (health["slots"], health["busy"], health["free"]) == (2, 1, 1), health
    second = submit_long(svc, tiny_model_dir)
    wait_running(svc, second, min_step=1)
    by_job = {w["job_id"]: w for w in svc.health()["workers"]}
    assert set(by_job) == {first, second} and all(w["busy"] for w in by_job.values()), by_job
    assert len({w["name"] for w in by_job.values()}) == 2  # one job on each worker

    # The first worker's host loses power: its slot goes once its heartbeat lapses, its job is queued again
    # and resumed on the other worker from its saved state once that one is free.
    at_kill = wait_running(svc, first, min_step=6)["progress"]["current_step"]
    original = svc.workers[0]
    assert svc.job(first)["worker"] == f"{socket.gethostname()}:{original.pid}"
    os.killpg(original.pid, signal.SIGKILL)
    original.wait()
    wait_until(lambda: _slots(svc) == 1, timeout=30, what="the dead worker's slot to lapse")
    status = svc.get("/status").json()
    assert status["capacity"]["slots"] == 1 and len(status["capacity"]["workers"]) == 1, status
    assert svc.post(f"/jobs/{second}/cancel").status_code == 202  # frees the survivor for the lost job
    done = svc.wait_for(first, {"succeeded", "failed", "cancelled"}, timeout=240)
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    assert done["worker"] == f"{socket.gethostname()}:{svc.workers[1].pid}"
    events = [e["message"] for e in svc.get(f"/jobs/{first}/events", params={"limit": 1000}).json()["data"]]
    resumed = [m for m in events if "resuming from step" in m]
    assert len(resumed) == 1 and at_kill >= 5, (resumed, at_kill)


def test_with_no_worker_up_train_says_so_and_openai_jobs_wait_for_one(service: Service, tiny_model_dir: Path) -> None:
    service.stop_worker()  # it leaves (or, killed when its stop is slow, its heartbeat lapses)
    wait_until(lambda: service.health()["slots"] == 0, timeout=30, what="the stopped worker's slot to go")
    assert service.health() == {"slots": 0, "busy": 0, "free": 0, "cap": None, "workers": []}
    refused = submit(service, tiny_model_dir)
    assert refused.status_code == 409 and "no training worker is up" in refused.json()["detail"], refused.text
    assert not list((service.base_path / "datasets").glob("*.jsonl"))  # nothing kept of the refused upload

    client = OpenAI(base_url=service.url + "/v1", api_key="unused")
    file_id = client.files.create(file=("d.jsonl", jsonl(easy_records(4))), purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=file_id,
                                         hyperparameters={"n_epochs": 1})  # fmt: skip
    assert job.status == "queued"
    service.start_worker()  # the line moves as soon as a worker comes
    wait_until(lambda: client.fine_tuning.jobs.retrieve(job.id).status == "succeeded", timeout=180,
               gives_up=lambda: client.fine_tuning.jobs.retrieve(job.id).status in ("failed", "cancelled"),
               what="the queued job to train once a worker came")  # fmt: skip
