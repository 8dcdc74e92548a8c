"""The waiting line and pause/resume in process: FIFO admission beyond the slots, its limit (429 in each
surface's shape), cancelling and pausing waiting jobs, and the webhook outbox each ending leaves."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import redis
from fastapi.testclient import TestClient
from openai import OpenAI

from api.main import create_app
from shared import keys
from shared.jobs import JobStatus
from shared.settings import Settings
from shared.store import JobStore
from shared.tasks import QUEUE
from tests.data import easy_records, jsonl
from tests.fixtures.worker_announcement import announced_worker


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # The webhook dispatcher empties the outbox as it goes: polling once (at start) leaves it to be read here.
    return settings.model_copy(update={"max_queued_jobs": 2, "reap_interval_s": 3600, "webhook_poll_interval_s": 3600})


@pytest.fixture
def api(settings: Settings, redis_client: redis.Redis) -> Iterator[TestClient]:
    with announced_worker(redis_client, settings), TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture
def client(api: TestClient) -> Iterator[OpenAI]:
    with OpenAI(base_url="http://testserver/v1", api_key="any", max_retries=0, http_client=api) as c:
        yield c


def _create(client: OpenAI, file_id: str) -> Any:
    return client.fine_tuning.jobs.create(model="some/model", training_file=file_id)


def _published(redis_client: redis.Redis) -> list[str]:
    """Job ids whose tasks are in the broker's queue, oldest first."""
    messages = redis_client.lrange(QUEUE, 0, -1)
    return [json.loads(m)["headers"]["id"] for m in reversed(messages)]  # type: ignore[union-attr]


def _outbox(redis_client: redis.Redis) -> list[tuple[str, str]]:
    entries = [json.loads(e) for e in redis_client.lrange(keys.WEBHOOK_OUTBOX, 0, -1)]  # type: ignore[union-attr]
    return [(e["job_id"], e["status"]) for e in entries]


def test_jobs_beyond_the_slots_wait_in_line_and_start_in_order(
    client: OpenAI, store: JobStore, settings: Settings, redis_client: redis.Redis
) -> None:
    file_id = client.files.create(file=("t.jsonl", jsonl(easy_records(4))), purpose="fine-tune").id
    first, second, third = (_create(client, file_id) for _ in range(3))
    assert [j.status for j in (first, second, third)] == ["queued"] * 3
    assert [j.queue_position for j in (first, second, third)] == [None, 1, 2]
    assert store.active_ids() == [first.id] and store.waiting_ids() == [second.id, third.id]
    assert _published(redis_client) == [first.id]  # only a job holding a slot has a task

    with pytest.raises(openai.RateLimitError) as full:  # past LORA_MAX_QUEUED_JOBS: a 429, nothing kept
        _create(client, file_id)
    assert (full.value.code, full.value.type) == ("queue_full", "rate_limit_exceeded")
    assert "2 jobs already wait" in full.value.message
    assert len(client.fine_tuning.jobs.list().data) == 3
    assert len(list(settings.volume.datasets.glob("job-*.jsonl"))) == 3

    # Cancelling a waiting job takes it out of line; the one behind moves up.
    assert client.fine_tuning.jobs.cancel(second.id).status == "cancelled"
    assert client.fine_tuning.jobs.retrieve(third.id).queue_position == 1  # type: ignore[attr-defined]
    # A slot frees: the next in line gets it at once and its task is published.
    client.fine_tuning.jobs.cancel(first.id)
    assert store.active_ids() == [third.id] and store.waiting_ids() == []
    assert _published(redis_client) == [first.id, third.id]
    assert client.fine_tuning.jobs.retrieve(third.id).queue_position is None  # type: ignore[attr-defined]
    assert store.promote(max_slots=1, queue_timeout_s=60) == []  # never handed out twice
    # Each ending is due as a webhook, in the order the jobs ended.
    assert _outbox(redis_client) == [(second.id, "cancelled"), (first.id, "cancelled")]


def test_train_keeps_the_seeds_409_unless_asked_to_queue(api: TestClient, store: JobStore, settings: Settings) -> None:
    def train(**params: str) -> Any:
        files = {"file": ("d.jsonl", jsonl(easy_records(4)), "application/jsonl")}
        return api.post("/train", files=files, params=params)

    first = train().json()["job_id"]
    assert train().status_code == 409
    queued = train(queue="true")
    assert queued.status_code == 202, queued.text
    body = queued.json()
    assert body["queue_position"] == 1 and "waiting for a free slot (position 1)" in body["message"]
    assert api.get(f"/jobs/{body['job_id']}").json()["queue_position"] == 1
    # While a job waits, the seed's rule still answers 409: that slot is spoken for.
    api.post(f"/jobs/{first}/cancel")
    assert train().status_code == 409
    # Joining the line hands the free slot to its head (it joins behind it, then moves up).
    assert train(queue="true").json()["queue_position"] == 1
    assert store.active_ids() == [body["job_id"]]
    assert train(queue="true").json()["queue_position"] == 2
    full = train(queue="true")
    assert full.status_code == 429 and full.json()["max_queued_jobs"] == 2
    assert len(list(settings.volume.datasets.glob("job-*.jsonl"))) == 4


def test_pause_and_resume_move_a_job_out_of_and_back_into_line(
    client: OpenAI, api: TestClient, store: JobStore, redis_client: redis.Redis
) -> None:
    file_id = client.files.create(file=("t.jsonl", jsonl(easy_records(4))), purpose="fine-tune").id
    job = _create(client, file_id)
    paused = client.fine_tuning.jobs.pause(job.id)  # not started yet: paused at once, its slot freed
    assert paused.status == "paused" and store.active_ids() == []
    assert client.fine_tuning.jobs.pause(job.id).status == "paused"  # asking again changes nothing
    other = _create(client, file_id)  # the free slot is taken by another job
    resumed = client.fine_tuning.jobs.resume(job.id)
    assert (resumed.status, resumed.queue_position) == ("queued", 1)  # type: ignore[attr-defined]
    record = store.get(job.id)
    assert record is not None and record.attempts == 0 and record.status is JobStatus.queued
    with pytest.raises(openai.BadRequestError) as not_paused:
        client.fine_tuning.jobs.resume(job.id)
    assert "only a paused job can be resumed" in not_paused.value.message
    native = api.post(f"/jobs/{other.id}/resume")
    assert native.status_code == 409 and native.json()["status"] == "queued"
    # The native surface pauses too; the slot it frees goes to the job resumed above.
    assert api.post(f"/jobs/{other.id}/pause").json()["status"] == "paused"
    assert store.active_ids() == [job.id] and store.waiting_ids() == []
    assert api.post(f"/jobs/{other.id}/cancel").json()["status"] == "cancelled"
    with pytest.raises(openai.BadRequestError) as ended:
        client.fine_tuning.jobs.pause(other.id)
    assert ended.value.code == "invalid_job_state" and "only a queued or running job" in ended.value.message
    assert _outbox(redis_client) == [(other.id, "cancelled")]
