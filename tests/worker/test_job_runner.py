"""What the job runner does with a job's W&B integration before training starts."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import redis

from shared.config import TrainConfig
from shared.events import WarningNotice
from shared.jobs import JobRecord, JobStatus, WandbSpec
from shared.store import JobStore
from tests.service import wait_until
from worker.job_runner import use_wandb
from worker.lease import LeaseKeeper

SPEC = WandbSpec(project="lora-tests", entity="team", name="run-1", tags=["ci", "nightly"])


@pytest.fixture
def lease(redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> Iterator[LeaseKeeper]:
    # The runner writes os.environ itself (in a child process of its own, in production): give it a copy.
    environ = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    monkeypatch.setattr(os, "environ", environ)
    store = JobStore(redis_client)
    record = JobRecord(id="job-w", status=JobStatus.queued, created_at=0, config=TrainConfig(), dataset_path="d",
                       output_dir="o", wandb=SPEC)  # fmt: skip
    assert store.admit(record, max_slots=1, queue_timeout_s=60).admitted
    assert store.claim("job-w", token="t", lease_s=30, worker="w") == "ok"
    with LeaseKeeper(store, "job-w", "t", lease_s=30) as keeper:
        yield keeper
    assert store.get("job-w").wandb == SPEC  # type: ignore[union-attr]


def test_the_jobs_project_entity_and_tags_reach_the_run(lease: LeaseKeeper) -> None:
    os.environ["WANDB_MODE"] = "offline"
    use_wandb(SPEC, lease)
    assert (os.environ["WANDB_PROJECT"], os.environ["WANDB_ENTITY"], os.environ["WANDB_TAGS"]) == (
        "lora-tests",
        "team",
        "ci,nightly",
    )


def test_without_wandb_on_the_worker_the_job_is_told(lease: LeaseKeeper, redis_client: redis.Redis) -> None:
    use_wandb(SPEC, lease)
    assert "WANDB_PROJECT" not in os.environ
    store = JobStore(redis_client)
    (warning,) = wait_until(
        lambda: [e for e in store.events("job-w") if isinstance(e.data, WarningNotice)], timeout=5, what="a warning"
    )
    assert "W&B is not configured on this worker" in warning.message
