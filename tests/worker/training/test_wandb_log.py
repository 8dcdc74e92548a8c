"""A job's W&B integration reaches its run; without W&B on the worker the job is told, never broken."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.events import EventPayload, InfoNotice, WarningNotice
from shared.jobs import WandbSpec
from worker.training.wandb_log import WandbRun

SPEC = WandbSpec(project="lora-tests", name="run-1", tags=["ci", "nightly"])


def test_the_jobs_project_name_and_tags_reach_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    events: list[tuple[EventPayload, str]] = []
    run = WandbRun("job-1", {"epochs": 1}, lambda event, message: events.append((event, message)), SPEC)
    try:
        assert run._run is not None
        assert (run._run.project, run._run.name, tuple(run._run.tags)) == ("lora-tests", "run-1", ("ci", "nightly"))
        run.log({"train/loss": 1.0}, step=1)
    finally:
        run.finish({"final_loss": 1.0})
    assert [type(e) for e, _ in events] == [InfoNotice]


def test_without_wandb_on_the_worker_the_job_is_told(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    events: list[tuple[EventPayload, str]] = []
    run = WandbRun("job-1", {}, lambda event, message: events.append((event, message)), SPEC)
    run.log({"train/loss": 1.0}, step=1)  # a no-op, not an error
    ((event, message),) = events
    assert isinstance(event, WarningNotice) and "W&B is not configured on this worker" in message
