"""The webhook dispatcher, run by the app's own lifespan over the real Redis-compatible server, sending to real
HTTP receivers. The outbox is fed here the way the job transitions' Lua scripts feed it."""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import redis
from fastapi.testclient import TestClient
from openai import OpenAI
from standardwebhooks import Webhook

from api.main import create_app
from api.webhooks.dispatcher import retry_delay_s
from api.webhooks.queue import WebhookQueue
from shared import keys
from shared.settings import Settings
from tests.data import easy_records, jsonl
from tests.fixtures.worker_announcement import announced_worker
from tests.service import wait_until
from tests.webhook_receiver import Receiver, webhook_receiver

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()


def _settings(tmp_path: Path, redis_url: str, urls: list[str], **extra: Any) -> Settings:
    return Settings(
        base_path=tmp_path / "base",
        redis_url=redis_url,
        webhook_url=urls,
        webhook_secret=SECRET if urls else None,  # type: ignore[arg-type]
        webhook_poll_interval_s=0.05,
        webhook_retry_base_s=0.2,
        **extra,
    )


@contextmanager
def _api(settings: Settings) -> Iterator[TestClient]:
    with (
        announced_worker(redis.Redis.from_url(settings.redis_url, decode_responses=True), settings),
        TestClient(create_app(settings)) as client,
    ):
        yield client


def _push(client: redis.Redis, job_id: str, status: str = "succeeded", event_id: str = "1733150000000-0") -> None:
    """What a terminal transition's Lua script does."""
    entry = {"event_id": event_id, "job_id": job_id, "status": status, "created_at": time.time()}
    client.rpush(keys.WEBHOOK_OUTBOX, json.dumps(entry))
    client.ltrim(keys.WEBHOOK_OUTBOX, -10000, -1)


def _settled(client: redis.Redis) -> bool:
    return client.llen(keys.WEBHOOK_OUTBOX) == 0 and client.zcard(keys.WEBHOOK_PENDING) == 0


def _ids(receiver: Receiver) -> list[str]:
    return [r.headers["webhook-id"] for r in receiver.received]


def test_an_ended_job_is_posted_signed_in_openais_shape(
    tmp_path: Path, redis_client: redis.Redis, redis_url: str
) -> None:
    with webhook_receiver() as receiver, _api(_settings(tmp_path, redis_url, [receiver.url])):
        _push(redis_client, "job-aaa111", "cancelled")
        got = wait_until(receiver.accepted, timeout=10, what="the webhook")
        wait_until(lambda: _settled(redis_client), timeout=5, what="the delivery to be settled")
    [delivery] = got
    assert delivery.path == "/hook" and delivery.headers["content-type"] == "application/json"
    assert Webhook(SECRET).verify(delivery.body, delivery.headers)["data"] == {"id": "job-aaa111"}
    with OpenAI(api_key="unused", base_url="http://127.0.0.1:9") as client:
        event = client.webhooks.unwrap(delivery.body, delivery.headers, secret=SECRET)
    assert event.type == "fine_tuning.job.cancelled" and event.data.id == "job-aaa111"  # type: ignore[union-attr]
    assert event.id == delivery.headers["webhook-id"] and event.object == "event"
    assert abs(int(delivery.headers["webhook-timestamp"]) - time.time()) < 10


def test_a_train_job_cancelled_while_queued_sends_its_webhook(
    tmp_path: Path, redis_client: redis.Redis, redis_url: str
) -> None:
    """The real producer: the cancel transition's own Lua script leaves the outbox entry."""
    with webhook_receiver() as receiver, _api(_settings(tmp_path, redis_url, [receiver.url])) as api:
        files = {"file": ("d.jsonl", jsonl(easy_records(4)), "application/jsonl")}
        job_id = api.post("/train", files=files).json()["job_id"]
        assert api.post(f"/jobs/{job_id}/cancel").status_code == 200
        [got] = wait_until(receiver.accepted, timeout=10, what="the cancelled job's webhook")
        ended = api.get(f"/jobs/{job_id}").json()["finished_at"]
    with OpenAI(api_key="unused", base_url="http://127.0.0.1:9") as client:
        event = client.webhooks.unwrap(got.body, got.headers, secret=SECRET)
    assert event.type == "fine_tuning.job.cancelled" and event.data.id == job_id  # type: ignore[union-attr]
    assert event.created_at == int(ended)


def test_a_failing_receiver_is_retried_with_growing_delays_and_gets_the_event_once(
    tmp_path: Path, redis_client: redis.Redis, redis_url: str
) -> None:
    def fail_twice(n: int) -> tuple[int, float]:
        return (500 if n < 2 else 204), 0.0

    with webhook_receiver(fail_twice) as receiver, _api(_settings(tmp_path, redis_url, [receiver.url])):
        _push(redis_client, "job-bbb222")
        wait_until(receiver.accepted, timeout=10, what="the webhook after two failures")
        wait_until(lambda: _settled(redis_client), timeout=5, what="the delivery to be settled")
        time.sleep(1.0)  # many polls and longer than any retry delay: nothing more may arrive
    assert [r.status for r in receiver.received] == [500, 500, 204]
    assert len(set(_ids(receiver))) == 1  # one event, the same id on every attempt
    first, second, third = (r.at for r in receiver.received)
    # Base 0.2 s, jitter half to all: the first retry waits 0.1-0.2 s, the second 0.2-0.4 s.
    assert second - first >= 0.1 and third - second >= 0.2
    for r in receiver.received:
        assert Webhook(SECRET).verify(r.body, r.headers)["type"] == "fine_tuning.job.succeeded"


def test_a_dead_or_hanging_receiver_does_not_hold_up_the_others(
    tmp_path: Path, redis_client: redis.Redis, redis_url: str
) -> None:
    def hang(_: int) -> tuple[int, float]:
        return 200, 2.0  # past the sender's 0.5 s timeout: a failure every time

    def refuse(_: int) -> tuple[int, float]:
        return 503, 0.0

    with ExitStack() as stack:
        hanging, dead, good = (stack.enter_context(webhook_receiver(a)) for a in (hang, refuse, lambda _: (200, 0.0)))
        settings = _settings(
            tmp_path, redis_url, [hanging.url, dead.url, good.url], webhook_timeout_s=0.5, webhook_max_attempts=3
        )
        stack.enter_context(_api(settings))
        started = time.monotonic()
        _push(redis_client, "job-ccc333")
        wait_until(lambda: len(good.received) == 1, timeout=10, what="the good receiver's webhook")
        assert time.monotonic() - started < 0.45  # before the hanging receiver's first timeout
        _push(redis_client, "job-ddd444", "failed")
        wait_until(lambda: len(good.received) == 2, timeout=10, what="the second webhook")
        # The others are given up after 3 attempts each; the good one is never sent anything again.
        wait_until(lambda: _settled(redis_client), timeout=30, what="every delivery to be settled")
        time.sleep(0.5)
    assert len(dead.received) == 6 and hanging.requests == 6
    assert len(good.received) == 2 and len(set(_ids(good))) == 2
    assert sorted(json.loads(r.body)["data"]["id"] for r in good.received) == ["job-ccc333", "job-ddd444"]


def test_two_api_processes_deliver_each_event_once(tmp_path: Path, redis_client: redis.Redis, redis_url: str) -> None:
    with webhook_receiver() as receiver:
        settings = _settings(tmp_path, redis_url, [receiver.url])
        with _api(settings), _api(settings):
            for i in range(40):
                _push(redis_client, f"job-{i:06d}", event_id=f"{i}-0")
            wait_until(lambda: len(receiver.received) >= 40, timeout=20, what="40 webhooks")
            wait_until(lambda: _settled(redis_client), timeout=5, what="the deliveries to be settled")
            time.sleep(0.5)
    bodies = [json.loads(r.body)["data"]["id"] for r in receiver.received]
    assert sorted(bodies) == [f"job-{i:06d}" for i in range(40)]


def test_a_delivery_claimed_by_a_dispatcher_that_died_is_sent_once_its_claim_lapses(
    tmp_path: Path, redis_client: redis.Redis, redis_url: str
) -> None:
    with webhook_receiver() as receiver:
        _push(redis_client, "job-eee555")
        queue = WebhookQueue(redis_client)
        assert queue.fan_out([receiver.url]) == 1
        assert len(queue.claim(limit=10, lease_s=1.0)) == 1  # ...and then this dispatcher dies
        assert queue.claim(limit=10, lease_s=1.0) == []  # nobody else takes it meanwhile
        with _api(_settings(tmp_path, redis_url, [receiver.url])):
            time.sleep(0.5)
            assert receiver.received == []
            wait_until(receiver.accepted, timeout=10, what="the webhook after the claim lapsed")
            wait_until(lambda: _settled(redis_client), timeout=5, what="the delivery to be settled")
    assert json.loads(receiver.received[0].body)["data"]["id"] == "job-eee555"
    assert len(receiver.received) == 1


def test_without_a_receiver_the_outbox_is_emptied(tmp_path: Path, redis_client: redis.Redis, redis_url: str) -> None:
    for i in range(50):
        _push(redis_client, f"job-{i:06d}")
    with _api(_settings(tmp_path, redis_url, [])):
        wait_until(lambda: _settled(redis_client), timeout=10, what="the outbox to be emptied")


def test_an_unreadable_outbox_entry_is_dropped_and_the_rest_delivered(
    tmp_path: Path, redis_client: redis.Redis, redis_url: str
) -> None:
    with webhook_receiver() as receiver, _api(_settings(tmp_path, redis_url, [receiver.url])):
        redis_client.rpush(keys.WEBHOOK_OUTBOX, "not json", json.dumps({"job_id": "job-x"}))
        _push(redis_client, "job-fff666")
        wait_until(receiver.accepted, timeout=10, what="the readable webhook")
        wait_until(lambda: _settled(redis_client), timeout=5, what="everything to be settled")
    assert [json.loads(r.body)["data"]["id"] for r in receiver.received] == ["job-fff666"]


def test_retry_delays_double_with_jitter_and_span_about_an_hour_by_default(tmp_path: Path) -> None:
    settings = Settings(base_path=tmp_path)
    for attempts_made in range(1, 8):
        nominal = settings.webhook_retry_base_s * 2 ** (attempts_made - 1)
        assert nominal / 2 <= retry_delay_s(settings, attempts_made) <= nominal
    longest = sum(settings.webhook_retry_base_s * 2**i for i in range(settings.webhook_max_attempts - 1))
    assert 1800 <= longest <= 2 * 3600
