"""The OpenAI-compatible surface, driven by the official `openai` client against the real service.

(Its refusals and its conversion of our objects are tests/api/test_openai.py's, in process.)
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai import OpenAI
from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent

from tests.data import easy_records, jsonl, preference_records
from tests.service import Service, wait_until


@pytest.fixture
def client(service: Service) -> Iterator[OpenAI]:
    with OpenAI(base_url=service.url + "/v1", api_key="any-key", max_retries=0, timeout=60) as c:
        yield c


def _upload(client: OpenAI, n: int = 8) -> str:
    return client.files.create(file=("train.jsonl", jsonl(easy_records(n))), purpose="fine-tune").id


def _wait(client: OpenAI, service: Service, job_id: str, statuses: set[str], timeout: float = 180) -> FineTuningJob:
    def reached() -> FineTuningJob | None:
        job = client.fine_tuning.jobs.retrieve(job_id)
        return job if job.status in statuses else None

    return wait_until(reached, timeout=timeout, what=lambda: f"{job_id} to reach {statuses}\n{service.logs('worker')}")


def test_upload_train_follow_and_list_a_job(client: OpenAI, service: Service, tiny_model_dir: Path) -> None:
    uploaded = client.files.create(file=("my data.jsonl", jsonl(easy_records(8))), purpose="fine-tune")
    assert uploaded.id.startswith("file-") and uploaded.object == "file"
    assert (uploaded.purpose, uploaded.status, uploaded.filename) == ("fine-tune", "processed", "my data.jsonl")
    stored = service.base_path / "datasets" / f"{uploaded.id}.jsonl"
    assert uploaded.bytes == stored.stat().st_size > 0
    assert client.files.retrieve(uploaded.id) == uploaded
    assert uploaded.id in [f.id for f in client.files.list()]
    assert client.files.content(uploaded.id).content == stored.read_bytes()
    validation = client.files.create(file=("valid.jsonl", jsonl(easy_records(4))), purpose="fine-tune")

    created = client.fine_tuning.jobs.create(
        model=str(tiny_model_dir),
        training_file=uploaded.id,
        validation_file=validation.id,
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 20, "batch_size": 4, "learning_rate_multiplier": 10}},
        },
        suffix="tiny bot",
        seed=7,
        metadata={"team": "nlp"},
        integrations=[{"type": "wandb", "wandb": {"project": "lora-tests", "tags": ["ci"]}}],
    )
    assert created.object == "fine_tuning.job" and created.status in ("queued", "running")
    assert (created.model, created.training_file, created.seed) == (str(tiny_model_dir), uploaded.id, 7)
    assert created.hyperparameters.model_dump() == {"n_epochs": 20, "batch_size": 4, "learning_rate_multiplier": 10}
    assert created.method is not None and created.method.type == "supervised"
    assert created.user_provided_suffix == "tiny bot"
    assert created.metadata == {"team": "nlp"}
    assert created.integrations and created.integrations[0].wandb.project == "lora-tests"
    assert created.fine_tuned_model is None and created.error is None and created.finished_at is None

    # One job model underneath: the native view shows the mapped training config.
    native = service.get(f"/jobs/{created.id}").json()
    assert native["config"]["epochs"] == 20 and native["config"]["learning_rate"] == pytest.approx(3e-3)
    assert native["config"]["seed"] == 7 and native["config"]["model_save_path"].startswith("ft-tiny-bot-")

    job = _wait(client, service, created.id, {"succeeded", "failed", "cancelled"})
    assert job.status == "succeeded", job
    assert job.error is None and job.trained_tokens and job.trained_tokens > 0
    assert job.finished_at is not None and job.finished_at >= job.created_at
    # OpenAI's naming, with the base's one name (its name in the models directory, however the job spelled it)
    assert job.fine_tuned_model == f"ft:{tiny_model_dir.name}:tiny bot:{job.id}"
    adapter = Path(service.job(job.id)["model_path"])
    assert adapter.parent == service.base_path.resolve() and adapter.name.startswith("ft-tiny-bot-")
    assert (adapter / "adapter_config.json").is_file()

    listed = client.fine_tuning.jobs.list(limit=10)
    assert [j.id for j in listed.data] == [job.id] and listed.has_more is False
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "nlp"})] == [job.id]
    assert client.fine_tuning.jobs.list(metadata={"team": "other"}).data == []

    # Events: newest first, metrics with step and train_loss; paging with `after` walks them all once.
    everything = client.fine_tuning.jobs.list_events(job.id, limit=1000)
    events = everything.data
    assert everything.has_more is False and all(e.object == "fine_tuning.job.event" for e in events)
    assert [e.created_at for e in events] == sorted((e.created_at for e in events), reverse=True)
    metrics = [e for e in events if e.type == "metrics"]
    assert len(metrics) == 40
    steps = [e.data["step"] for e in metrics]  # type: ignore[index]
    assert steps == list(range(40, 0, -1))
    assert all(isinstance(e.data["train_loss"], float) for e in metrics)  # type: ignore[index]
    assert all(0 <= e.data["train_mean_token_accuracy"] <= 1 for e in metrics)  # type: ignore[index]
    assert events[0].type == "message" and "completed" in events[0].message.lower()
    assert events[-1].message == "Job queued"
    paged = list(client.fine_tuning.jobs.list_events(job.id, limit=7))  # auto-paginates through `after`
    assert [e.id for e in paged] == [e.id for e in events]

    # Checkpoints (the worker keeps the last few, one per epoch): OpenAI's shape, newest first, paged.
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id, limit=100).data
    assert checkpoints and checkpoints[0].step_number == 40
    for ckpt in checkpoints:
        assert ckpt.object == "fine_tuning.job.checkpoint" and ckpt.fine_tuning_job_id == job.id
        assert ckpt.fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-{ckpt.step_number}"
        assert ckpt.metrics.step == ckpt.step_number and ckpt.metrics.train_loss is not None
        m = ckpt.metrics
        figures = (m.train_mean_token_accuracy, m.valid_loss, m.full_valid_loss, m.full_valid_mean_token_accuracy)
        assert all(isinstance(x, float) for x in figures), m
    assert [c.step_number for c in checkpoints] == sorted((c.step_number for c in checkpoints), reverse=True)
    assert [c.id for c in client.fine_tuning.jobs.checkpoints.list(job.id, limit=1)] == [c.id for c in checkpoints]

    # The result file: OpenAI's step_metrics.csv, one row per logged step, a file like any other until deleted.
    (result_id,) = job.result_files
    result = client.files.retrieve(result_id)
    assert (result.purpose, result.filename) == ("fine-tune-results", "step_metrics.csv")
    text = client.files.content(result_id).content.decode()
    assert result.bytes == len(text.encode())
    header, *rows = list(csv.reader(text.splitlines()))
    assert header == ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
    assert [int(r[0]) for r in rows] == list(range(1, 41))  # as many rows as logged steps (the 40 metrics events)
    assert all(r[1] and r[2] and r[3] and r[4] for r in rows), rows[:3]
    assert float(rows[-1][1]) < float(rows[0][1]) and float(rows[-1][2]) > float(rows[0][2])  # it learned
    assert result_id in [f.id for f in client.files.list()]
    assert client.files.delete(result_id).deleted is True
    assert client.fine_tuning.jobs.retrieve(job.id).result_files == []
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(result_id)

    # The job keeps its data when the file is deleted.
    assert client.files.delete(uploaded.id).deleted is True
    assert not stored.exists()
    assert (service.base_path / "datasets" / f"{job.id}.jsonl").is_file()
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


def _steps(client: OpenAI, job_id: str) -> list[int]:
    """The steps of the job's `metrics` events, in the order they were logged."""
    events = client.fine_tuning.jobs.list_events(job_id, limit=1000).data
    return [int(e.data["step"]) for e in reversed(events) if e.type == "metrics"]  # type: ignore[index]


def test_jobs_wait_in_line_through_restarts_and_pause_resume_continues(
    client: OpenAI, service: Service, tiny_model_dir: Path
) -> None:
    # A worker that dies mid-job gets another run (LORA_MAX_ATTEMPTS), continuing from its saved state.
    service.stop()
    service.env_extra.update({"LORA_MAX_ATTEMPTS": "2", "LORA_STATE_EVERY_STEPS": "5"})
    service.start()
    file_id = _upload(client)
    create = client.fine_tuning.jobs.create
    first = create(model=str(tiny_model_dir), training_file=file_id,
                   hyperparameters={"n_epochs": 12, "batch_size": 1})  # fmt: skip
    _wait(client, service, first.id, {"running"})
    second = create(model=str(tiny_model_dir), training_file=file_id, hyperparameters={"n_epochs": 1})
    third = create(model=str(tiny_model_dir), training_file=file_id, hyperparameters={"n_epochs": 1})
    assert (second.status, second.queue_position, third.queue_position) == ("queued", 1, 2)  # type: ignore[attr-defined]

    # The API and the worker both go down (the worker as a host losing power, mid-step); the line is kept.
    wait_until(lambda: len(_steps(client, first.id)) >= 12, timeout=120, what="12 steps of the first job")
    service.stop_api()
    service.kill_worker_tree()
    service.start_worker()
    service.start_api()
    assert client.fine_tuning.jobs.retrieve(third.id).queue_position == 2  # type: ignore[attr-defined]
    job = _wait(client, service, first.id, {"running"}, timeout=60)

    def resumed() -> FineTuningJobEvent | None:
        events = client.fine_tuning.jobs.list_events(first.id, limit=1000).data
        return next((e for e in events if "resuming from step" in e.message), None)

    resumed_at = wait_until(resumed, timeout=60, what=lambda: f"the first job to resume\n{service.logs('worker')}")
    step = int(resumed_at.data["resumed_step"])  # type: ignore[index]
    # Its last saved state, not step 0: states are saved every 5 steps and at epoch ends (8 steps each).
    assert step >= 10 and (step % 5 == 0 or step % 8 == 0), resumed_at

    # Pause: the job saves its state at the next step and frees its slot; the next in line starts.
    assert client.fine_tuning.jobs.pause(first.id).status in ("pausing", "paused")
    paused = _wait(client, service, first.id, {"paused"}, timeout=60)
    paused_at = max(_steps(client, first.id))
    _wait(client, service, second.id, {"running", "succeeded"}, timeout=60)
    assert client.fine_tuning.jobs.cancel(third.id).status == "cancelled"  # cancelled while waiting
    assert client.fine_tuning.jobs.retrieve(third.id).finished_at is not None
    assert _wait(client, service, second.id, {"succeeded"}).status == "succeeded"

    # Resume: it waits for a slot, then continues where it stopped and finishes every step.
    assert client.fine_tuning.jobs.resume(paused.id).status == "queued"
    job = _wait(client, service, first.id, {"succeeded", "failed", "cancelled"})
    assert job.status == "succeeded", job
    steps = _steps(client, first.id)
    assert steps[-1] == 96 and paused_at + 1 in steps
    assert steps.count(paused_at + 1) == 1  # no step after the pause was trained twice
    # Its result file has each step once, across the crash, the pause and the resume.
    (result_id,) = job.result_files
    rows = client.files.content(result_id).content.decode().splitlines()[1:]
    assert [int(row.split(",")[0]) for row in rows] == list(range(1, 97))
    with pytest.raises(openai.BadRequestError) as not_paused:
        client.fine_tuning.jobs.resume(first.id)
    assert not_paused.value.code == "invalid_job_state"


def test_a_dpo_job_trains_on_a_preference_file(client: OpenAI, service: Service, tiny_model_dir: Path) -> None:
    uploaded = client.files.create(file=("prefs.jsonl", jsonl(preference_records(8))), purpose="fine-tune")
    created = client.fine_tuning.jobs.create(
        model=str(tiny_model_dir),
        training_file=uploaded.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "n_epochs": 2}}},
    )
    job = _wait(client, service, created.id, {"succeeded", "failed", "cancelled"})
    assert job.status == "succeeded", job
    assert job.method is not None and job.method.type == "dpo" and job.method.dpo is not None
    assert job.method.dpo.hyperparameters is not None
    assert (job.method.dpo.hyperparameters.beta, job.method.dpo.hyperparameters.n_epochs) == (0.1, 2)
    assert job.fine_tuned_model == f"ft:{tiny_model_dir.name}::{job.id}"
    native = service.get(f"/jobs/{job.id}").json()
    assert (native["config"]["method"], native["config"]["dpo_beta"]) == ("dpo", 0.1)
    assert (Path(native["model_path"]) / "adapter_config.json").is_file()
    metrics = [e for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data if e.type == "metrics"]
    assert len(metrics) == 4  # 8 pairs, 4 a step, 2 epochs
    first = min(metrics, key=lambda e: e.data["step"])  # type: ignore[index]
    assert abs(first.data["train_loss"] - 0.6931) < 1e-3  # type: ignore[index]  # log 2: policy == reference
    assert all({"reward_margin", "reward_accuracy"} <= set(e.data) for e in metrics)  # type: ignore[arg-type]
