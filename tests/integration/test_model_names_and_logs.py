"""The first week with the service, against the real thing (uvicorn, a Celery worker, a Redis-compatible server):
a base model named `tiny` (its folder under base_path) gives adapters and checkpoints that record its absolute
path; two spellings of one base are one model in /v1/models and in `ft:` names; a job says it is loading its
model before its first step; and an ordinary job leaves no WARNING in the worker's log (no lease warning, no
library progress bar)."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.volume import Volume
from tests.data import easy_records, jsonl
from tests.service import Service, flush

# Celery's line for a record: "[time: LEVEL/process] message"; the stderr it captures is logged at WARNING.
_LEVEL = re.compile(r"^\[[^\]]*: (?P<level>[A-Z]+)/[^\]]*\] (?P<message>.*)$")


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory, redis_url: str, tiny_model_dir: Path) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("first-week")
    base = root / "base"
    shutil.copytree(tiny_model_dir, base / "tiny")  # "model_name": "tiny"
    (base / "tiny-link").symlink_to(base / "tiny")  # another spelling of the same folder
    flush(redis_url)
    service = Service(
        base_path=base, redis_url=redis_url, log_dir=root / "logs", env_extra={"LORA_MAX_CONCURRENT_JOBS": "1"}
    )
    service.start()
    try:
        yield service
    finally:
        service.stop()


def _train(svc: Service, model: str, **config: Any) -> str:
    cfg = {"model_name": model, "epochs": 2, "batch_size": 4, **config}
    files = {"config": (None, json.dumps(cfg)), "file": ("d.jsonl", jsonl(easy_records(8)))}
    r = svc.post("/train", params={"queue": "true"}, files=files)
    assert r.status_code == 202, r.text
    job_id = str(r.json()["job_id"])
    assert svc.wait_for(job_id, {"succeeded", "failed", "cancelled"})["status"] == "succeeded", svc.logs("worker")
    return job_id


def _fine_tune(svc: Service, model: str) -> dict[str, Any]:
    r = svc.post("/v1/files", files={"file": ("d.jsonl", jsonl(easy_records(8)))}, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    body = {"model": model, "training_file": r.json()["id"], "hyperparameters": {"n_epochs": 1, "batch_size": 4}}
    created = svc.post("/v1/fine_tuning/jobs", json=body)
    assert created.status_code == 200, created.text
    job_id = created.json()["id"]
    assert svc.wait_for(job_id, {"succeeded", "failed", "cancelled"})["status"] == "succeeded", svc.logs("worker")
    job = svc.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert isinstance(job, dict)
    return job


def _events(svc: Service, job_id: str) -> list[dict[str, Any]]:
    data = svc.get(f"/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    assert isinstance(data, list)
    return data


def _recorded_base(folder: Path) -> str:
    return str(json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"])


def test_an_adapter_and_its_checkpoint_record_the_base_by_its_absolute_path(svc: Service) -> None:
    job_id = _train(svc, "tiny")
    job = svc.job(job_id)
    checkpoints = svc.get(f"/jobs/{job_id}/checkpoints").json()["data"]
    assert checkpoints, job
    root = Volume(svc.base_path).job_checkpoints(job_id)
    folders = [Path(job["model_path"]), *(root / c["name"] for c in checkpoints)]
    expected = str((svc.base_path / "tiny").resolve())
    for folder in folders:
        recorded = _recorded_base(folder)
        assert recorded == expected and Path(recorded).is_absolute() and (Path(recorded) / "config.json").is_file()


def test_a_job_says_it_is_loading_its_model_before_its_first_step(svc: Service) -> None:
    job_id = _train(svc, "tiny")
    events = _events(svc, job_id)
    messages = [e["message"] for e in events]
    loading = next(i for i, m in enumerate(messages) if m.startswith("loading model "))
    loaded = next(i for i, m in enumerate(messages) if m.startswith("model loaded in ") or "reused" in m)
    first_step = next(i for i, e in enumerate(events) if e["type"] == "metrics")
    assert loading < loaded < first_step, messages
    assert str((svc.base_path / "tiny").resolve()) in messages[loading]
    openai_events = svc.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
    assert any(e["message"].startswith("loading model ") for e in openai_events), openai_events


def test_two_spellings_of_one_base_are_one_model(svc: Service) -> None:
    spellings = ["tiny", f"{svc.base_path}/./tiny/", "tiny-link"]
    jobs = [_fine_tune(svc, model) for model in spellings]
    assert [job["model"] for job in jobs] == spellings  # each job shows the model as it was asked for
    assert {job["fine_tuned_model"].split(":")[1] for job in jobs} == {"tiny"}
    models = [m["id"] for m in svc.get("/v1/models").json()["data"]]
    bases = [m for m in models if not m.startswith("ft:")]
    assert bases == ["tiny"], models
    for job in jobs:
        assert job["fine_tuned_model"] in models
    for spelling in spellings:  # any spelling finds the one base
        found = svc.get(f"/v1/models/{spelling}")
        assert found.status_code == 200 and found.json()["id"] == "tiny", found.text


def test_ordinary_jobs_leave_no_warning_in_the_worker_log(svc: Service) -> None:
    _train(svc, "tiny", epochs=1)  # at least one job, whatever ran before
    warnings = []
    for line in svc.logs("worker").splitlines():
        match = _LEVEL.match(line)
        if match and match["level"] in ("WARNING", "ERROR", "CRITICAL"):
            warnings.append(line)
    # Not the lease's end, not a progress bar (its text follows the WARNING line, after a carriage return),
    # not a library's notice about another: nothing at all.
    assert warnings == [], svc.logs("worker")
    assert "Loading weights" not in svc.logs("worker") and "it/s]" not in svc.logs("worker")


def test_the_service_is_still_up(svc: Service) -> None:
    assert httpx.get(f"{svc.url}/status").status_code == 200
