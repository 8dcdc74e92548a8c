"""Helpers for fault tests: start a service with custom settings, submit long jobs, read process trees."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx

from tests.data import easy_records, jsonl
from tests.service import Service


def submit(service: Service, model_dir: Path, **config: Any) -> httpx.Response:
    cfg = {"model_name": str(model_dir), "epochs": 1, **config}
    files = {"config": (None, json.dumps(cfg)), "file": ("d.jsonl", jsonl(easy_records(8)))}
    return service.post("/train", files=files)


def submit_long(service: Service, model_dir: Path, epochs: int = 400) -> str:
    """A job that trains for a while (tens of seconds on this CPU); returns its id."""
    r = submit(service, model_dir, epochs=epochs, batch_size=2)
    assert r.status_code == 202, r.text
    return str(r.json()["job_id"])


def wait_running(service: Service, job_id: str, min_step: int = 2, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = service.get(f"/jobs/{job_id}").json()
        if job["status"] == "running" and job["progress"]["current_step"] >= min_step:
            return job
        assert job["status"] in ("queued", "running"), job
        time.sleep(0.2)
    raise AssertionError(f"job never trained: {job}\n{service.logs('worker')}")


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def running_events(service: Service, job_id: str) -> list[dict[str, Any]]:
    events = service.get(f"/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    return [e for e in events if e["type"] == "status" and e["data"].get("status") == "running"]
