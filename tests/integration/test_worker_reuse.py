"""A worker child runs job after job with the base model kept loaded (and without, when turned off)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.process_tree import children
from tests.service import Service, flush, submit, wait_until


@pytest.fixture
def fresh_children(tmp_path: Path, redis_url: str, tiny_model_dir: Path) -> Iterator[Service]:
    """The service with the old behaviour: a fresh child per job."""
    flush(redis_url)
    svc = Service(base_path=tmp_path / "base", redis_url=redis_url, log_dir=tmp_path / "logs",
                  env_extra={"LORA_KEEP_BASE_MODEL": "false"})  # fmt: skip
    svc.start()
    try:
        yield svc
    finally:
        svc.stop()


def _run(service: Service, model_dir: Path) -> tuple[dict[str, Any], float]:
    """Run a job to its end; its base-model event, and seconds from claimed (running) to its first step."""
    r = submit(service, model_dir, epochs=2)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    job = service.wait_for(job_id, {"succeeded", "failed", "cancelled"}, timeout=180)
    assert job["status"] == "succeeded", job
    events = service.get(f"/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    (base,) = [e for e in events if "base_model" in e["data"]]
    claimed = next(e for e in events if e["type"] == "status" and e["data"]["status"] == "running")
    first_step = next(e for e in events if e["type"] == "metrics")
    return base, first_step["created_at"] - claimed["created_at"]


def test_two_jobs_in_a_row_share_one_child_and_its_loaded_base(service: Service, tiny_model_dir: Path) -> None:
    assert service.worker is not None
    first, cold_s = _run(service, tiny_model_dir)
    (child,) = children(service.worker.pid)
    second, warm_s = _run(service, tiny_model_dir)
    assert children(service.worker.pid) == [child]  # the same child ran both
    assert (first["data"]["base_model"], first["data"]["reason"]) == ("loaded", "first job on this worker")
    assert second["data"]["base_model"] == "reused" and "reused from the previous job" in second["message"]
    # Compile caches live on the volume, where every host sees them.
    assert second["data"]["compile_cache"] == str(service.base_path / ".cache" / "torch-compile")
    assert (service.base_path / ".cache" / "torch-compile").is_dir()
    print(f"\nclaimed -> step 1: first job {cold_s:.2f} s (loaded), second job {warm_s:.2f} s (reused)")


def test_without_keep_base_model_each_job_gets_a_fresh_child(fresh_children: Service, tiny_model_dir: Path) -> None:
    svc = fresh_children
    assert svc.worker is not None
    first, _ = _run(svc, tiny_model_dir)
    # The child that will run the next job (Celery may be between replacing the first one and forking the next).
    pid = svc.worker.pid

    def one_child() -> list[int] | None:
        found = children(pid)
        return found if len(found) == 1 else None

    (child,) = wait_until(one_child, timeout=30, every=0.1, what="the pool's child for the next job")
    second, _ = _run(svc, tiny_model_dir)
    assert [e["data"]["base_model"] for e in (first, second)] == ["loaded", "loaded"]
    assert second["data"]["reason"] == "the base is not kept between jobs"
    # Celery replaces a child after its task returns, a moment after the job's outcome is recorded
    wait_until(
        lambda: child not in children(svc.worker.pid), timeout=30, every=0.1, what="the job's child to be replaced"
    )
