"""/v1/chat/completions' refusals and bounds, in process with no generation worker (one is faked by its
heartbeat where a test needs the API to count on one): the end-to-end answers are
tests/integration/test_chat.py's."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from api.main import create_app
from shared import keys
from shared.generation import GenerationRequest
from shared.generation_queue import heartbeat
from shared.jobs import Progress
from shared.settings import Settings
from shared.store import JobStore
from tests.data import easy_records, jsonl
from tests.fixtures.worker_announcement import announced_worker

BASE = "tiny-base"


@pytest.fixture
def api(tmp_path: Path, redis_client: redis.Redis, redis_url: str) -> Iterator[TestClient]:
    settings = Settings(base_path=tmp_path / "base", redis_url=redis_url, min_free_disk_mb=1,
                        generation_max_pending=1, generation_timeout_s=1.0, generation_max_tokens=100)  # fmt: skip
    (settings.base_path / BASE).mkdir(parents=True)
    (settings.base_path / BASE / "config.json").write_text("{}")
    with announced_worker(redis_client, settings), TestClient(create_app(settings)) as client:
        files = {"config": (None, json.dumps({"model_name": BASE})), "file": ("d.jsonl", jsonl(easy_records(8)))}
        r = client.post("/train", files=files)
        assert r.status_code == 202, r.text
        _trains_a_step(JobStore(redis_client), r.json()["job_id"])  # the base model is now "in use"
        yield client


def _trains_a_step(store: JobStore, job_id: str) -> None:
    """What a worker does once it has loaded the job's base: claim the job, report a step."""
    assert store.claim(job_id, token="t", lease_s=60, worker="w") == "ok"
    store.renew(job_id, token="t", lease_s=60, progress=Progress(current_step=1, total_steps=8))


def _chat(api: TestClient, **body: object) -> tuple[int, dict[str, object]]:
    r = api.post("/v1/chat/completions", json={"model": BASE, "messages": [{"role": "user", "content": "hi"}], **body})
    return r.status_code, r.json()


def test_models_lists_the_base_in_use_and_nothing_unknown(api: TestClient) -> None:
    listed = api.get("/v1/models").json()
    assert listed["object"] == "list" and [m["id"] for m in listed["data"]] == [BASE]
    assert api.get(f"/v1/models/{BASE}").json()["object"] == "model"
    missing = api.get("/v1/models/ft:x::job-nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_base_models_come_from_an_index_rebuilt_from_the_history_when_missing(
    api: TestClient, redis_client: redis.Redis
) -> None:
    assert api.get(f"/v1/models/{BASE}").status_code == 200
    assert [name for name, _ in redis_client.zrange(keys.BASE_MODELS, 0, -1, withscores=True)] == [BASE]
    redis_client.delete(keys.BASE_MODELS)  # as on a volume whose jobs ran before the index existed
    assert api.get(f"/v1/models/{BASE}").status_code == 200
    assert redis_client.zscore(keys.BASE_MODELS, BASE) is not None
    assert api.get("/v1/models/tiny-typo").status_code == 404


def test_a_base_no_job_has_loaded_is_not_a_model(api: TestClient, redis_client: redis.Redis) -> None:
    settings: Settings = api.app.state.settings  # type: ignore[attr-defined]
    (settings.base_path / "other-base").mkdir()
    (settings.base_path / "other-base" / "config.json").write_text("{}")
    files = {"config": (None, json.dumps({"model_name": "other-base"})), "file": ("d.jsonl", jsonl(easy_records(8)))}
    assert api.post("/train?queue=true", files=files).status_code == 202  # waits: no worker ever loads it
    assert [m["id"] for m in api.get("/v1/models").json()["data"]] == [BASE]
    assert api.get("/v1/models/other-base").status_code == 404
    assert redis_client.zscore(keys.BASE_MODELS, "other-base") is None


def test_a_base_the_rule_no_longer_accepts_is_not_listed(api: TestClient) -> None:
    settings: Settings = api.app.state.settings  # type: ignore[attr-defined]
    (settings.base_path / BASE / "config.json").unlink()  # the folder is no longer a model
    assert api.get("/v1/models").json()["data"] == []
    assert api.get(f"/v1/models/{BASE}").status_code == 404


def test_unsupported_parameters_and_limits_are_refused_by_name(api: TestClient) -> None:
    for body, param in (({"tools": []}, "tools"), ({"n": 2}, "n"), ({"logprobs": True}, "logprobs"),
                        ({"max_tokens": 101}, "max_tokens"), ({"max_completion_tokens": 101}, "max_completion_tokens"),
                        ({"stop": ["a", "b", "c", "d", "e"]}, "stop")):  # fmt: skip
        status, answer = _chat(api, **body)
        assert status == 400 and answer["error"]["param"] == param, (body, answer)  # type: ignore[index]
    status, answer = _chat(api, model="nope")
    assert status == 404 and answer["error"]["param"] == "model"  # type: ignore[index]


def test_no_generation_worker_is_a_503_at_once(api: TestClient) -> None:
    status, answer = _chat(api)
    assert status == 503 and answer["error"]["code"] == "no_generation_worker"  # type: ignore[index]


def test_a_full_queue_is_a_429_and_a_late_answer_a_504_that_cancels(api: TestClient, redis_client: redis.Redis) -> None:
    heartbeat(redis_client, "fake-generator")
    redis_client.rpush(keys.GENERATE_QUEUE, "someone else's request")
    status, answer = _chat(api)
    assert status == 429 and answer["error"]["code"] == "generation_queue_full"  # type: ignore[index]

    redis_client.delete(keys.GENERATE_QUEUE)
    status, answer = _chat(api, stream=True)
    assert status == 504 and answer["error"]["type"] == "timeout"  # type: ignore[index]
    queued = GenerationRequest.model_validate_json(str(redis_client.lpop(keys.GENERATE_QUEUE)))
    folder = (api.app.state.settings.base_path / BASE).resolve()  # type: ignore[attr-defined]
    assert queued.base_model == str(folder) and queued.adapter_path is None and queued.sampling.max_tokens == 100
    assert redis_client.exists(keys.generation_cancel_key(queued.id))  # the worker that pops it skips it
