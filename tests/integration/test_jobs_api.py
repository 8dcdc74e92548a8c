"""The jobs resource, its events (paged and live), health, readiness and metrics over real HTTP."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from tests.service import Service, submit, wait_running, wait_until


def _run_jobs(service: Service, model_dir: Path, n: int) -> list[str]:
    ids = []
    for _ in range(n):
        r = submit(service, model_dir)
        assert r.status_code == 202, r.text
        ids.append(r.json()["job_id"])
        service.wait_for(ids[-1], {"succeeded", "failed"})
    return ids


def test_events_are_ordered_and_resumable_by_cursor(service: Service, tiny_model_dir: Path) -> None:
    (job_id,) = _run_jobs(service, tiny_model_dir, 1)
    everything = service.get(f"/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    types = [e["type"] for e in everything]
    assert types[0] == "status" and everything[0]["data"]["status"] == "queued"
    assert everything[-1]["data"].get("status") == "succeeded"
    assert "warning" in types  # flash_attention_2 fell back to sdpa on this CPU
    assert "metrics" in types and "epoch" in types
    ids = [e["id"] for e in everything]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
    page = service.get(f"/jobs/{job_id}/events", params={"limit": 3}).json()
    assert [e["id"] for e in page["data"]] == ids[:3] and page["has_more"]
    rest = service.get(f"/jobs/{job_id}/events", params={"after": page["last_id"], "limit": 1000}).json()
    assert [e["id"] for e in rest["data"]] == ids[3:]
    assert service.get(f"/jobs/{job_id}/events", params={"after": "nonsense"}).status_code == 400


def _read_sse(url: str, headers: dict[str, str], stop_after: int | None = None) -> list[dict[str, str]]:
    events: list[dict[str, str]] = []
    current: dict[str, str] = {}
    with httpx.stream("GET", url, headers=headers, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line:
                if current:
                    events.append(current)
                    current = {}
                    if stop_after is not None and len(events) >= stop_after:
                        break
                continue
            if line.startswith(":"):
                continue
            key, _, value = line.partition(": ")
            current[key] = value
    return events


def test_live_event_stream_follows_a_job_and_resumes_with_last_event_id(service: Service, tiny_model_dir: Path) -> None:
    r = submit(service, tiny_model_dir, epochs=4, batch_size=2)
    job_id = r.json()["job_id"]
    url = f"{service.url}/jobs/{job_id}/events/stream"
    head = _read_sse(url, {}, stop_after=4)
    assert head[0]["event"] == "status"
    resumed = _read_sse(url, {"Last-Event-ID": head[-1]["id"]})
    assert resumed[-1]["event"] == "end"
    streamed = [e["id"] for e in head + resumed if "id" in e]
    paged = [e["id"] for e in service.get(f"/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]]
    assert streamed == paged  # nothing lost or repeated across the reconnect
    metrics = [json.loads(e["data"]) for e in resumed if e.get("event") == "metrics"]
    assert metrics and all("loss" in m["data"] for m in metrics)


def test_health_readiness_and_metrics(service: Service, tiny_model_dir: Path) -> None:
    assert service.get("/healthz").json() == {"status": "ok"}
    ready = wait_until(lambda: service.get("/readyz").json().get("workers"), timeout=30, every=0.3, what="a worker")
    assert len(ready) == 1
    r = submit(service, tiny_model_dir, epochs=200, batch_size=2)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    wait_running(service, job_id, min_step=3)
    text = service.get("/metrics").text
    assert 'lora_jobs{status="running"} 1' in text
    assert "lora_workers_alive 1" in text
    assert f'lora_training_tokens_per_second{{job_id="{job_id}"}}' in text
    assert f'lora_training_step_seconds{{job_id="{job_id}"}}' in text
    assert "lora_queue_depth 0" in text
    service.post(f"/jobs/{job_id}/cancel")
    service.wait_for(job_id, {"cancelled"})
    service.stop_worker()
    gone = wait_until(lambda: (reply := service.get("/readyz")).status_code == 503 and reply, timeout=60, every=1)
    assert "no worker" in gone.json()["reason"]
