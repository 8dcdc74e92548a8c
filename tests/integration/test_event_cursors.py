"""An event cursor a client sends is a stream id or a precise 400, on every surface that takes one; never a 500.

Over real HTTP against the API process (no worker: the job is a queued record with events of its own).
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import redis

from shared.config import TrainConfig
from shared.events import WarningNotice
from shared.jobs import JobRecord, JobStatus
from shared.store import JobStore
from shared.stream_ids import LAST
from tests.service import Service, flush

JOB = "job-cursors"
OUT_OF_RANGE = ["99999999999999999999-0", "18446744073709551616-0", "1-18446744073709551616"]
GARBAGE = ["abc", "-1-0", "1-", "1-2-3", "", " 1-0", "١-0"]  # the last: Arabic-Indic digit one, not ASCII


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Service]:
    """The API alone, on a database of its own, with one queued job that has three events."""
    url = redis_url.rsplit("/", 1)[0] + "/9"  # a database of its own: no other fixture flushes it
    flush(url)
    root = tmp_path_factory.mktemp("cursors")
    svc = Service(base_path=root / "base", redis_url=url, log_dir=root / "logs")
    svc.base_path.mkdir(parents=True)
    svc.log_dir.mkdir(parents=True)
    with redis.Redis.from_url(url, decode_responses=True) as client:
        store = JobStore(client)
        record = JobRecord(id=JOB, status=JobStatus.queued, created_at=0, config=TrainConfig(epochs=1),
                           dataset_path="d", output_dir="o")  # fmt: skip
        assert store.admit(record, max_slots=1, queue_timeout_s=3600).admitted
        for n in range(2):
            store.add_event(JOB, WarningNotice.model_validate({"detail": n}), f"warning {n}")
    svc.start_api()
    try:
        yield svc
    finally:
        svc.stop()


def _served_normally(api: Service) -> None:
    assert api.get("/healthz").status_code == 200
    events = api.get(f"/jobs/{JOB}/events").json()["data"]
    assert len(events) == 3  # queued, and the two warnings
    assert len(api.get(f"/v1/fine_tuning/jobs/{JOB}/events").json()["data"]) == 3


def _native_400(reply: httpx.Response, name: str, where: str, value: str) -> None:
    assert reply.status_code == 400, (value, reply.status_code, reply.text)
    body = reply.json()
    assert body["detail"].startswith(f"{name}: "), body
    assert "out of range" in body["detail"] or "is not a stream id" in body["detail"], body
    assert [e["loc"] for e in body["errors"]] == [[where, name]]


@pytest.mark.parametrize("value", OUT_OF_RANGE + GARBAGE)
def test_a_bad_after_on_the_events_page_is_a_400_naming_it(api: Service, value: str) -> None:
    _native_400(api.get(f"/jobs/{JOB}/events", params={"after": value}), "after", "query", value)


@pytest.mark.parametrize("value", OUT_OF_RANGE + GARBAGE)
def test_a_bad_cursor_on_the_event_stream_is_a_400_before_it_starts(api: Service, value: str) -> None:
    url = f"/jobs/{JOB}/events/stream"
    _native_400(api.get(url, params={"after": value}), "after", "query", value)
    if value.strip() == value and value.isascii() and value:  # an HTTP header value cannot carry the others
        _native_400(api.get(url, headers={"Last-Event-ID": value}), "Last-Event-ID", "header", value)
        # The header is checked even where the query would do.
        _native_400(
            api.get(url, headers={"Last-Event-ID": value}, params={"after": "0-0"}), "Last-Event-ID", "header", value
        )


@pytest.mark.parametrize("value", OUT_OF_RANGE + GARBAGE)
def test_a_bad_ftevent_cursor_is_an_openai_400_on_after(api: Service, value: str) -> None:
    for sent in (f"ftevent-{value}", value):
        reply = api.get(f"/v1/fine_tuning/jobs/{JOB}/events", params={"after": sent})
        assert reply.status_code == 400, (sent, reply.text)
        error = reply.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == "after", error
        assert error["message"].startswith("after: ") and "not an event id this API returned" in error["message"]


def test_the_last_possible_id_is_accepted_and_nothing_comes_after_it(api: Service) -> None:
    page = api.get(f"/jobs/{JOB}/events", params={"after": LAST})
    assert page.status_code == 200, page.text
    assert page.json()["data"] == [] and page.json()["has_more"] is False
    # The stream reads nothing after it either: the job is still queued, so it is cut off after the headers.
    with httpx.stream("GET", f"{api.url}/jobs/{JOB}/events/stream", headers={"Last-Event-ID": LAST}, timeout=10) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    openai_page = api.get(f"/v1/fine_tuning/jobs/{JOB}/events", params={"after": f"ftevent-{LAST}"})
    assert openai_page.status_code == 200, openai_page.text
    assert len(openai_page.json()["data"]) == 3  # newest first: every event is older than the last possible id
    # and nothing is older than the first
    oldest = api.get(f"/v1/fine_tuning/jobs/{JOB}/events", params={"after": "ftevent-0-0"})
    assert oldest.status_code == 200 and oldest.json()["data"] == [], oldest.text


def test_ids_accepted_before_still_page_as_before(api: Service) -> None:
    events = api.get(f"/jobs/{JOB}/events").json()["data"]
    first = events[0]["id"]
    assert [e["id"] for e in api.get(f"/jobs/{JOB}/events", params={"after": first}).json()["data"]] == [
        e["id"] for e in events[1:]
    ]
    ms, seq = first.split("-")
    padded = f"{int(ms):020d}-{int(seq):020d}"  # twenty digits each, zero-padded, as the old pattern allowed
    assert api.get(f"/jobs/{JOB}/events", params={"after": padded}).json()["data"] == events[1:]
    assert api.get(f"/jobs/{JOB}/events", params={"after": "0-0"}).json()["data"] == events
    newest = api.get(f"/v1/fine_tuning/jobs/{JOB}/events").json()["data"]
    older = api.get(f"/v1/fine_tuning/jobs/{JOB}/events", params={"after": newest[0]["id"]}).json()["data"]
    assert older == newest[1:]


def test_the_service_serves_normally_after_the_bad_cursors(api: Service) -> None:
    for value in OUT_OF_RANGE:
        api.get(f"/jobs/{JOB}/events", params={"after": value})
        api.get(f"/jobs/{JOB}/events/stream", headers={"Last-Event-ID": value})
        api.get(f"/v1/fine_tuning/jobs/{JOB}/events", params={"after": f"ftevent-{value}"})
    _served_normally(api)
    assert "Traceback" not in api.logs("api")
