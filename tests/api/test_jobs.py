"""The jobs resource in process: lookups, merge submission, cancel, typed events and checkpoints."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from shared import keys
from shared.config import TrainConfig
from shared.events import StatusChanged
from shared.job_api import EventPage
from shared.jobs import JobRecord, JobStatus
from shared.metrics import EpochEnd, StepMetrics
from shared.settings import Settings
from shared.store import JobStore
from shared.volume import CHECKPOINT_META, CheckpointMeta


def _queued(store: JobStore, job_id: str) -> None:
    record = JobRecord(id=job_id, status=JobStatus.queued, created_at=0, config=TrainConfig(epochs=1),
                       dataset_path="d", output_dir="o")  # fmt: skip
    assert store.admit(record, max_slots=1, queue_timeout_s=60).admitted
    time.sleep(0.002)  # creation times are milliseconds: keep each job's its own


def _finished(store: JobStore, settings: Settings, job_id: str = "job-done", *, status: JobStatus) -> Path:
    """A training job that ran and ended with `status` (its adapter folder exists when it succeeded)."""
    adapter = settings.base_path / f"adapter-{job_id}"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    _queued(store, job_id)
    assert store.claim(job_id, token="t", lease_s=30, worker="w") == "ok"
    assert store.finish(job_id, token="t", status=status, message="done", model_path=str(adapter.resolve()))
    return adapter.resolve()


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/jobs/job-nope"), ("GET", "/jobs/job-nope/events"), ("GET", "/jobs/job-nope/events/stream"),
     ("GET", "/jobs/job-nope/artifacts"), ("GET", "/jobs/job-nope/checkpoints"),
     ("GET", "/jobs/job-nope/artifacts/archive"), ("POST", "/jobs/job-nope/merge"), ("POST", "/jobs/job-nope/cancel"),
     ("GET", "/jobs/job-1:events")],
)  # fmt: skip
def test_an_unknown_job_is_a_404_naming_it(api: TestClient, method: str, path: str) -> None:
    r = api.request(method, path)
    assert r.status_code == 404
    assert r.json() == {"detail": f"no job {path.split('/')[2]!r}"}


def test_a_merge_is_a_job_of_its_own_on_the_finished_adapter(
    api: TestClient, store: JobStore, settings: Settings
) -> None:
    adapter = _finished(store, settings, status=JobStatus.succeeded)
    r = api.post("/jobs/job-done/merge")
    assert r.status_code == 202, r.text
    merge = store.get(r.json()["job_id"])
    assert merge is not None and merge.kind == "merge" and merge.source_job == "job-done"
    assert merge.dataset_path == str(adapter) and merge.num_records == 0
    assert merge.output_dir == str(adapter.parent / "adapter-job-done-merged")


@pytest.mark.parametrize(
    ("output_path", "needle"),
    [("../../escape", "resolves outside base_path"), ("adapter-job-done", "would replace the adapter being merged"),
     (".redis", "reserved for the service's own files")],
)  # fmt: skip
def test_a_merge_output_that_is_not_ours_to_write_is_a_422(
    api: TestClient, store: JobStore, settings: Settings, output_path: str, needle: str
) -> None:
    _finished(store, settings, status=JobStatus.succeeded)
    r = api.post("/jobs/job-done/merge", json={"output_path": output_path})
    assert r.status_code == 422, r.text
    assert needle in r.json()["detail"] and r.json()["errors"][0]["loc"] == ["body", "output_path"]
    assert store.active_ids() == []


def test_a_job_without_an_adapter_cannot_be_merged_or_downloaded(
    api: TestClient, store: JobStore, settings: Settings
) -> None:
    _finished(store, settings, status=JobStatus.failed)
    merge = api.post("/jobs/job-done/merge")
    assert merge.status_code == 409 and merge.json()["status"] == "failed"
    archive = api.get("/jobs/job-done/artifacts/archive")
    assert archive.status_code == 409
    assert archive.json() == {"detail": "job 'job-done' has no adapter: it is failed", "status": "failed"}


def test_the_list_is_newest_first_paginated_and_filtered(api: TestClient, store: JobStore, settings: Settings) -> None:
    ids = [f"job-{i}" for i in range(3)]
    for job_id in ids:
        _finished(store, settings, job_id, status=JobStatus.succeeded)
    _queued(store, "job-q")
    assert api.post("/jobs/job-q/cancel").json()["status"] == "cancelled"
    first = api.get("/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in first["data"]] == ["job-q", ids[2]]
    assert first["has_more"] and first["next_cursor"]
    second = api.get("/jobs", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [j["id"] for j in second["data"]] == [ids[1], ids[0]] and not second["has_more"]
    done = api.get("/jobs", params={"status": "succeeded"}).json()["data"]
    assert [j["id"] for j in done] == ids[::-1]
    cancelled = api.get("/jobs", params={"status": "cancelled"}).json()["data"]
    assert [j["id"] for j in cancelled] == ["job-q"]
    assert api.get("/jobs", params={"status": "bogus"}).status_code == 422
    assert api.get("/jobs", params={"cursor": "x"}).json() == {"detail": "cursor: not a cursor this API returned"}
    job = api.get(f"/jobs/{ids[0]}").json()
    assert {"config", "status", "created_at", "started_at", "finished_at", "progress", "metrics", "model_path"} <= set(
        job
    )
    assert job["created_at"] <= job["started_at"] <= job["finished_at"]


def test_cancel_removes_a_queued_job_and_refuses_an_ended_one(api: TestClient, store: JobStore) -> None:
    _queued(store, "job-q")
    assert api.post("/jobs/job-q/cancel").json()["status"] == "cancelled"
    again = api.post("/jobs/job-q/cancel")
    assert again.status_code == 409
    assert again.json() == {"detail": "job 'job-q' has already ended (cancelled); nothing to cancel",
                            "status": "cancelled"}  # fmt: skip


def test_events_are_served_with_their_typed_payloads(api: TestClient, store: JobStore, settings: Settings) -> None:
    _finished(store, settings, status=JobStatus.succeeded)
    store.add_event("job-done", StepMetrics(step=1, epoch=1, loss=2.5, learning_rate=3e-4), "step 1/2 loss 2.5000")
    store.add_event("job-done", EpochEnd(epoch=1, step=2, loss=2.4, eval_loss=2.6), "epoch 1/1 done")
    page = EventPage.model_validate_json(api.get("/jobs/job-done/events").content)
    assert [e.type for e in page.data] == ["status", "status", "status", "metrics", "epoch"]
    assert page.data[0].data == StatusChanged(status=JobStatus.queued)
    assert page.data[3].data == StepMetrics(step=1, epoch=1, loss=2.5, learning_rate=3e-4)
    assert page.data[4].data == EpochEnd(epoch=1, step=2, loss=2.4, eval_loss=2.6)
    raw = api.get("/jobs/job-done/events", params={"after": page.data[2].id}).json()["data"]
    assert raw[0]["data"] == {"step": 1, "epoch": 1, "loss": 2.5, "accuracy": None, "valid_loss": None,
                              "valid_accuracy": None, "learning_rate": 3e-4, "grad_norm": None,
                              "tokens_per_second": None, "step_seconds": None, "reward_margin": None,
                              "reward_accuracy": None}  # fmt: skip


def test_checkpoints_in_the_shared_layout_are_listed(api: TestClient, store: JobStore, settings: Settings) -> None:
    _finished(store, settings, status=JobStatus.succeeded)
    folder = settings.volume.checkpoint("job-done", 12)
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"x" * 10)
    meta = CheckpointMeta(step=12, epoch=3, loss=1.5, eval_loss=1.75, created_at=time.time())
    (folder / CHECKPOINT_META).write_text(meta.model_dump_json())
    (settings.volume.job_checkpoints("job-done") / ".step-000015.abcd1234.tmp").mkdir()  # still being written
    (ckpt,) = api.get("/jobs/job-done/checkpoints").json()["data"]
    assert (ckpt["name"], ckpt["step"], ckpt["epoch"], ckpt["loss"], ckpt["eval_loss"]) == (
        "step-000012",
        12,
        3,
        1.5,
        1.75,
    )
    assert ckpt["total_bytes"] == 10 + len(meta.model_dump_json())
    assert ckpt["archive_url"] == "http://testserver/jobs/job-done/artifacts/archive?checkpoint=12"


def test_a_job_names_its_model_and_once_it_succeeded_its_ft_name(
    api: TestClient, store: JobStore, settings: Settings
) -> None:
    _finished(store, settings, "job-ok", status=JobStatus.succeeded)
    _finished(store, settings, "job-bad", status=JobStatus.failed)
    base = TrainConfig(epochs=1).model_name
    ok, bad = api.get("/jobs/job-ok").json(), api.get("/jobs/job-bad").json()
    assert ok["model"] == bad["model"] == base
    assert ok["fine_tuned_model"] == f"ft:{base}::job-ok" and bad["fine_tuned_model"] is None
    listed = {job["id"]: job for job in api.get("/jobs").json()["data"]}
    assert listed["job-ok"]["fine_tuned_model"] == ok["fine_tuned_model"]
    merge = api.get(f"/jobs/{api.post('/jobs/job-ok/merge').json()['job_id']}").json()
    assert merge["kind"] == "merge" and merge["model"] == base and merge["fine_tuned_model"] is None


def test_an_ended_job_shows_no_eta_even_from_an_older_record(api: TestClient, store: JobStore) -> None:
    _queued(store, "job-old")
    assert store.claim("job-old", token="t", lease_s=30, worker="w") == "ok"
    assert store.cancel("job-old") == "requested"
    store.finish("job-old", token="t", status=JobStatus.cancelled, message="Cancelled")
    # What a record written before the store cleared the ETA on every stop still holds.
    store.client.hset(keys.job_key("job-old"), "progress", '{"current_step":5,"total_steps":9,"eta_seconds":175.0}')
    job = api.get("/jobs/job-old").json()
    assert job["status"] == "cancelled" and job["progress"]["current_step"] == 5
    assert job["progress"]["eta_seconds"] is None
    assert "eta_seconds" not in api.get("/status").json()
