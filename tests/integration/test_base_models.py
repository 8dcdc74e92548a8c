"""Only the base models the deployment allows: each refused name is refused on `POST /train` and on
`POST /v1/fine_tuning/jobs` by the real service (uvicorn, a Celery worker, a Redis-compatible server), naming
the rule it breaks and leaving no job, no slot and no stored dataset behind; each kind of accepted name is
accepted on both; and `/v1/models` lists a base model only once a job has loaded it.

One service for the module, with an allow-list (LORA_ALLOWED_MODELS) wide enough for every other case, the
session's models directory (LORA_MODELS_DIR, the tiny model in it), the hub offline and a hub cache of its own
holding one model (its config alone: a worker cannot load it).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from shared.store import JobStore
from tests.data import easy_records, jsonl
from tests.fixtures.hub_cache import add_cached_model
from tests.service import Service, flush

CACHED = "hub-org/cached-model"  # in the service's hub cache, as its config alone
ALLOWED = ["/*", "link-*", "bases/*", "hub-org/*", "Qwen/*", "empty-folder", "tiny-typo", "tiny"]
OUTSIDE_ALLOWED = "elsewhere"  # a model folder under base_path that no pattern allows

# name -> what the refusal says (the rule it breaks)
REFUSED = {
    "../../etc": "contains a '..' component",
    "/etc": "is an absolute path outside base_path and every models directory (LORA_MODELS_DIR)",
    "link-out": "resolves outside base_path (through '..' or a symlink)",
    "a\x00b": "contains a control character",
    "Qwen/Qwen2.5-0.5B": "is not in the local Hugging Face cache and HF_HUB_OFFLINE is set",
    OUTSIDE_ALLOWED: "is not in this deployment's allowed models (LORA_ALLOWED_MODELS)",
    "empty-folder": "is not a model folder: it has no config.json",
    "tiny-typo": "is neither a model folder under base_path or a models directory",
}


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory, redis_url: str, tiny_model_dir: Path) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("base-models")
    cache = root / "hf-hub-cache"
    add_cached_model(cache, CACHED)
    base = root / "base"
    shutil.copytree(tiny_model_dir, base / "bases" / "tiny")  # a model folder under base_path
    shutil.copytree(tiny_model_dir, base / OUTSIDE_ALLOWED)
    (base / "empty-folder").mkdir()
    (base / "link-out").symlink_to(tiny_model_dir)  # a real model, but outside base_path
    flush(redis_url)
    env = {"LORA_ALLOWED_MODELS": json.dumps(ALLOWED), "HF_HUB_CACHE": str(cache), "LORA_MAX_CONCURRENT_JOBS": "1"}
    service = Service(base_path=base, redis_url=redis_url, log_dir=root / "logs", env_extra=env)
    service.start()
    try:
        yield service
    finally:
        service.stop()


def _train(svc: Service, model: str, **config: Any) -> httpx.Response:
    cfg = {"model_name": model, "epochs": 1, **config}
    files = {"config": (None, json.dumps(cfg)), "file": ("d.jsonl", jsonl(easy_records(8)))}
    return svc.post("/train", params={"queue": "true"}, files=files)


def _upload(svc: Service) -> str:
    r = svc.post("/v1/files", files={"file": ("d.jsonl", jsonl(easy_records(8)))}, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def _create(svc: Service, model: str, file_id: str) -> httpx.Response:
    body = {"model": model, "training_file": file_id, "hyperparameters": {"n_epochs": 1, "batch_size": 4}}
    return svc.post("/v1/fine_tuning/jobs", json=body)


def _state(svc: Service) -> dict[str, Any]:
    """What a refusal may not change: the jobs (both surfaces), /status, the stored datasets, the slots held
    and the waiting line."""
    with redis.Redis.from_url(svc.redis_url, decode_responses=True) as client:
        store = JobStore(client)
        slots, waiting = store.active_ids(), store.waiting_ids()
    return {
        "jobs": [job["id"] for job in svc.get("/jobs", params={"limit": 100}).json()["data"]],
        "openai_jobs": [job["id"] for job in svc.get("/v1/fine_tuning/jobs", params={"limit": 100}).json()["data"]],
        "status": svc.get("/status").json(),
        "datasets": sorted(p.name for p in (svc.base_path / "datasets").glob("*.jsonl")),
        "slots": slots,
        "waiting": waiting,
    }


@pytest.mark.parametrize("name", list(REFUSED), ids=[repr(n) for n in REFUSED])
def test_a_refused_name_is_a_422_on_train_naming_the_rule_and_leaves_nothing(svc: Service, name: str) -> None:
    before = _state(svc)
    r = _train(svc, name)
    assert r.status_code == 422, r.text
    body = r.json()
    assert REFUSED[name] in body["detail"], body
    (problem,) = body["errors"]
    assert problem["loc"] == ["config", "model_name"] and REFUSED[name] in problem["msg"], problem
    assert _state(svc) == before


@pytest.mark.parametrize("name", list(REFUSED), ids=[repr(n) for n in REFUSED])
def test_a_refused_name_is_a_400_on_fine_tuning_jobs_naming_the_rule_and_leaves_nothing(
    svc: Service, name: str
) -> None:
    file_id = _upload(svc)
    before = _state(svc)
    r = _create(svc, name, file_id)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "model_not_available", "model")
    assert REFUSED[name] in error["message"], error
    assert _state(svc) == before


def _accepted(svc: Service, tiny_model_dir: Path) -> dict[str, str]:
    """Each kind of accepted name -> the folder (or hub id) the job records as what the worker loads."""
    return {
        "bases/tiny": str((svc.base_path / "bases" / "tiny").resolve()),  # a folder under base_path
        str(tiny_model_dir): str(tiny_model_dir.resolve()),  # an absolute path in the models directory
        "tiny": str(tiny_model_dir.resolve()),  # a name relative to the models directory
        CACHED: CACHED,  # a hub id in the local cache (and an allow-list pattern: hub-org/*)
    }


def test_each_kind_of_allowed_model_is_accepted_on_both_surfaces(svc: Service, tiny_model_dir: Path) -> None:
    for name, location in _accepted(svc, tiny_model_dir).items():
        r = _train(svc, name)
        assert r.status_code == 202, (name, r.text)
        job_id = r.json()["job_id"]
        created = _create(svc, name, _upload(svc))
        assert created.status_code == 200, (name, created.text)
        assert created.json()["model"] == name
        for job in (job_id, created.json()["id"]):
            with redis.Redis.from_url(svc.redis_url, decode_responses=True) as client:
                record = JobStore(client).get(job)
            assert record is not None and (record.config.model_name, record.model_dir) == (name, location)
            svc.post(f"/jobs/{job}/cancel")  # accepted is all this test needs


def test_models_lists_a_base_only_once_a_job_loaded_it(svc: Service) -> None:
    loads = _train(svc, "bases/tiny")  # trains
    never = _train(svc, CACHED)  # accepted (its config is cached) but no worker can load it
    assert loads.status_code == never.status_code == 202, (loads.text, never.text)
    assert svc.wait_for(loads.json()["job_id"], {"succeeded", "failed"})["status"] == "succeeded"
    failed = svc.wait_for(never.json()["job_id"], {"succeeded", "failed"})
    assert failed["status"] == "failed" and failed["progress"]["current_step"] == 0, failed
    listed = [m["id"] for m in svc.get("/v1/models").json()["data"] if not m["id"].startswith("ft:")]
    assert "bases/tiny" in listed
    assert CACHED not in listed and svc.get(f"/v1/models/{CACHED}").status_code == 404
    assert not set(listed) & set(REFUSED)
