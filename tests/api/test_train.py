"""`POST /train` in process: admission, storage, publishing, and every refusal leaving nothing behind."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from shared.chat_formats import unknown_shape_reason
from shared.jobs import JobStatus
from shared.settings import Settings
from shared.store import JobStore
from shared.tasks import QUEUE, TRAIN_TASK
from tests.data import easy_records, jsonl

GOOD = jsonl(easy_records(2))


def _train(api: TestClient, config: dict[str, Any] | str | None = None, **files: Any) -> Any:
    parts: dict[str, Any] = {"file": ("d.jsonl", GOOD)} | files
    if config is not None:
        parts["config"] = (None, config if isinstance(config, str) else json.dumps(config))
    return api.post("/train", files={k: v for k, v in parts.items() if v is not None})


def _left_on_volume(settings: Settings) -> list[str]:
    datasets = settings.volume.datasets
    return sorted(str(p.relative_to(datasets)) for p in datasets.rglob("*") if p.is_file()) if datasets.exists() else []


def test_an_upload_is_stored_admitted_and_its_task_published(
    api: TestClient, settings: Settings, store: JobStore, redis_client: redis.Redis
) -> None:
    r = _train(api, {"epochs": 2, "model_save_path": "out/adapter"})
    assert r.status_code == 202, r.text
    body = r.json()
    job_id = body["job_id"]
    assert body["status"] == "training" and body["message"] == "Training job accepted: 2 records, 2 epochs"
    assert body["job_url"] == f"http://testserver/jobs/{job_id}"

    record = store.get(job_id)
    assert record is not None and record.status is JobStatus.queued and record.num_records == 2
    assert record.dataset_path == str(settings.volume.dataset(job_id))
    assert record.output_dir == str((settings.base_path / "out" / "adapter").resolve())
    stored = [json.loads(line) for line in settings.volume.dataset(job_id).read_text().splitlines()]
    assert stored == easy_records(2)
    assert _left_on_volume(settings) == [f"{job_id}.jsonl"]  # nothing in .incoming

    (message,) = redis_client.lrange(QUEUE, 0, -1)
    headers = json.loads(message)["headers"]
    assert (headers["task"], headers["id"]) == (TRAIN_TASK, job_id)
    status = api.get("/status").json()
    assert (status["status"], status["job_id"], status["total_epochs"]) == ("training", job_id, 2)


def test_the_base_model_and_the_adapter_to_continue_are_resolved_once_at_submission(
    api: TestClient, settings: Settings, store: JobStore
) -> None:
    (settings.base_path / "bases" / "tiny").mkdir(parents=True)
    (settings.base_path / "bases" / "tiny" / "config.json").write_text("{}")
    (settings.base_path / "earlier").mkdir()
    (settings.base_path / "earlier" / "adapter_config.json").write_text("{}")
    r = _train(api, {"model_name": "bases/tiny", "lora_path": "./earlier/"})
    assert r.status_code == 202, r.text
    record = store.get(r.json()["job_id"])
    assert record is not None
    # The record keeps the names the user gave (they name the model) and what the worker loads, resolved.
    assert (record.config.model_name, record.config.lora_path) == ("bases/tiny", "./earlier/")
    assert record.model_dir == str((settings.base_path / "bases" / "tiny").resolve())
    assert record.adapter_dir == str((settings.base_path / "earlier").resolve())


def test_a_validation_file_becomes_the_jobs_validation_dataset(
    api: TestClient, settings: Settings, store: JobStore
) -> None:
    r = _train(api, validation_file=("v.jsonl", jsonl(easy_records(4)[2:])))
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    record = store.get(job_id)
    assert record is not None and record.validation_path == str(settings.volume.dataset(f"{job_id}.validation"))
    assert _left_on_volume(settings) == [f"{job_id}.jsonl", f"{job_id}.validation.jsonl"]


def test_every_slot_taken_is_a_409_naming_the_job_and_nothing_is_stored(api: TestClient, settings: Settings) -> None:
    first = _train(api).json()["job_id"]
    busy = _train(api)
    assert busy.status_code == 409
    assert busy.json() == {
        "detail": f"Training already in progress (job {first}); every training slot is taken",
        "running_jobs": [first],
    }
    assert _left_on_volume(settings) == [f"{first}.jsonl"]


@pytest.mark.parametrize(
    ("config", "loc", "needle"),
    [
        ({"epochs": "three"}, ["config", "epochs"], "epochs: Input should be a valid integer"),
        ({"epoch": 3}, ["config", "epoch"], "epoch: Extra inputs are not permitted"),
        ("[1]", ["config"], "config must be a JSON object"),
        ('{"learning_rate": NaN}', ["config"], "NaN is not valid JSON"),
        ({"model_save_path": "../../etc"}, ["config", "model_save_path"], "resolves outside base_path"),
        ({"model_save_path": "checkpoints"}, ["config", "model_save_path"], "reserved for the service's own files"),
        ({"lora_path": "nothing-here"}, ["config", "lora_path"], "no adapter (adapter_config.json)"),
        ({"lora_path": "/etc"}, ["config", "lora_path"], "resolves outside base_path"),
    ],
)
def test_an_invalid_config_is_a_422_naming_the_field_and_leaves_nothing(
    api: TestClient, settings: Settings, store: JobStore, config: Any, loc: list[str], needle: str
) -> None:
    r = _train(api, config)
    assert r.status_code == 422, r.text
    assert needle in r.json()["detail"]
    assert r.json()["errors"][0]["loc"] == loc
    assert _left_on_volume(settings) == [] and store.current() is None


def test_an_invalid_dataset_names_each_bad_line(api: TestClient, settings: Settings) -> None:
    r = _train(api, file=("d.jsonl", GOOD + b'{"oops": 1}\n{"messages": []}\n'))
    assert r.status_code == 422
    assert r.json()["errors"] == [
        {"loc": ["file", "line 3"], "msg": unknown_shape_reason({"oops": 1})},
        {"loc": ["file", "line 4"], "msg": "'messages' must be a non-empty list"},
    ]
    assert r.json()["truncated"] is False
    assert _left_on_volume(settings) == []


def test_an_invalid_validation_file_removes_the_stored_training_data(api: TestClient, settings: Settings) -> None:
    r = _train(api, validation_file=("v.jsonl", b'{"messages": []}\n'))
    assert r.status_code == 422
    assert r.json()["errors"][0]["loc"] == ["validation_file", "line 1"]
    assert r.json()["detail"].startswith("validation_file: invalid dataset")
    assert _left_on_volume(settings) == []


@pytest.mark.parametrize(
    ("files", "content_type", "status", "needle"),
    [
        ({"file": ("d.jsonl", GOOD * 12_000)}, None, 413, "exceeds the 1 MB limit (LORA_MAX_UPLOAD_MB)"),
        (None, "application/json", 415, "send multipart/form-data"),
        ({"config": (None, "{}")}, None, 422, "missing the 'file' part"),
        ({"note": (None, "x" * 5000), "file": ("d.jsonl", GOOD)}, None, 413, "'note' exceeds 4 KiB"),
    ],
)
def test_an_unusable_body_is_refused_and_leaves_nothing(
    api: TestClient,
    settings: Settings,
    files: dict[str, Any] | None,
    content_type: str | None,
    status: int,
    needle: str,
) -> None:
    if files is None:
        r = api.post("/train", content=GOOD, headers={"content-type": str(content_type)})
    else:
        r = api.post("/train", files=files)
    assert r.status_code == status, r.text
    assert needle in r.json()["detail"]
    assert _left_on_volume(settings) == []


def test_redis_down_is_a_503_in_each_surfaces_shape(tmp_path: Path) -> None:
    from api.main import create_app
    from launcher.embedded_redis import free_port

    unreachable = Settings(base_path=tmp_path, redis_url=f"redis://:pw@127.0.0.1:{free_port()}/0")
    with TestClient(create_app(unreachable)) as api:
        native = api.get("/status")
        openai = api.get("/v1/fine_tuning/jobs/job-1")
        ready = api.get("/readyz")
    assert native.status_code == openai.status_code == ready.status_code == 503
    message = native.json()["detail"]
    assert message.startswith("the broker/job store (Redis at redis://***@127.0.0.1:") and "pw" not in message
    assert ready.json() == {"status": "unavailable", "reason": message}
    assert openai.json()["error"] == {
        "message": message,
        "type": "server_error",
        "param": None,
        "code": "store_unavailable",
    }


@pytest.mark.parametrize("contents", [{"config.json": "{}", "model.safetensors": "weights"}, {"notes.txt": "mine"}])
def test_an_output_folder_the_service_did_not_write_is_a_409_and_nothing_is_touched(
    api: TestClient, settings: Settings, store: JobStore, contents: dict[str, str]
) -> None:
    target = settings.base_path / "Qwen2.5-0.5B"
    target.mkdir(parents=True)
    for name, text in contents.items():
        (target / name).write_text(text)
    r = _train(api, {"model_save_path": "Qwen2.5-0.5B"})
    assert r.status_code == 409, r.text
    assert r.json()["path"] == "Qwen2.5-0.5B"
    assert r.json()["errors"] == [
        {"loc": ["config", "model_save_path"],
         "msg": "'Qwen2.5-0.5B' holds files this service did not write; the service never replaces it "
                "(choose another path, or empty it first)"},
    ]  # fmt: skip
    assert sorted(p.name for p in target.iterdir()) == sorted(contents)
    assert _left_on_volume(settings) == [] and store.current() is None


def test_an_earlier_output_of_the_service_or_an_empty_folder_may_be_replaced(
    api: TestClient, settings: Settings
) -> None:
    from shared.outputs import write_marker

    (settings.base_path / "empty").mkdir(parents=True)
    assert _train(api, {"model_save_path": "empty"}).status_code == 202
    store_dir = settings.base_path / "previous"
    store_dir.mkdir()
    write_marker(store_dir, "adapter")
    (store_dir / "adapter_config.json").write_text("{}")
    first = api.get("/status").json()["job_id"]  # one slot: cancel the first job before the next
    assert api.post(f"/jobs/{first}/cancel").status_code in (200, 202)
    assert _train(api, {"model_save_path": "previous"}).status_code == 202
