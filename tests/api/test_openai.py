"""The OpenAI-compatible surface in process, driven by the official `openai` client: conversion to and
from our jobs, the W&B integration carried on the job, and errors in OpenAI's envelope."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import redis
from fastapi.testclient import TestClient
from openai import OpenAI

from shared.events import WarningNotice
from shared.jobs import JobStatus, WandbSpec
from shared.metrics import EpochEnd, StepMetrics
from shared.settings import Settings
from shared.store import JobStore
from shared.volume import CHECKPOINT_META, CheckpointMeta
from tests.data import easy_records, jsonl
from worker.jobs.results import register_results
from worker.training.results_log import count_rows, csv_text


@pytest.fixture
def client(api: TestClient) -> Iterator[OpenAI]:
    with OpenAI(base_url="http://testserver/v1", api_key="any", max_retries=0, http_client=api) as c:
        yield c


def _upload(client: OpenAI, n: int = 4) -> str:
    return client.files.create(file=("train.jsonl", jsonl(easy_records(n))), purpose="fine-tune").id


def _create(client: OpenAI, file_id: str, **kw: Any) -> Any:
    return client.fine_tuning.jobs.create(model="some/model", training_file=file_id, **kw)


def test_a_job_created_here_is_one_of_ours_with_its_config_mapped(
    client: OpenAI, store: JobStore, settings: Settings
) -> None:
    file_id = _upload(client)
    created = _create(
        client,
        file_id,
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 5, "learning_rate_multiplier": 2}},
        },
        suffix="my bot!",
        seed=9,
        metadata={"team": "nlp"},
    )
    assert (created.status, created.model, created.training_file, created.seed) == ("queued", "some/model", file_id, 9)
    assert created.hyperparameters.model_dump() == {"n_epochs": 5, "batch_size": 4, "learning_rate_multiplier": 2.0}
    record = store.get(created.id)
    assert record is not None and record.status is JobStatus.queued and record.num_records == 4
    config = record.config
    assert (config.model_name, config.epochs, config.batch_size, config.seed) == ("some/model", 5, 4, 9)
    assert config.learning_rate == pytest.approx(6e-4)
    assert config.model_save_path == f"ft-my-bot-{created.id.removeprefix('job-')[:8]}"
    # The job has its own copy of the data: deleting the file leaves it.
    assert record.dataset_path == str(settings.volume.dataset(created.id))
    client.files.delete(file_id)
    assert settings.volume.dataset(created.id).read_bytes() == jsonl(easy_records(4))
    assert client.fine_tuning.jobs.retrieve(created.id).user_provided_suffix == "my bot!"
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "nlp"})] == [created.id]


def test_the_wandb_integration_travels_on_the_job_record(client: OpenAI, store: JobStore) -> None:
    wandb = {"project": "lora-tests", "entity": "team", "name": "run-1", "tags": ["ci", "nightly"]}
    created = _create(client, _upload(client), integrations=[{"type": "wandb", "wandb": wandb}])
    record = store.get(created.id)
    assert record is not None and record.wandb == WandbSpec(**wandb)
    assert created.integrations is not None and created.integrations[0].wandb.model_dump() == wandb
    with pytest.raises(openai.BadRequestError) as two:
        _create(client, _upload(client), integrations=[{"type": "wandb", "wandb": wandb}] * 2)
    assert two.value.param == "integrations" and "at most 1 item" in two.value.message


def test_our_events_and_checkpoints_read_as_openais(client: OpenAI, store: JobStore, settings: Settings) -> None:
    job_id = _create(client, _upload(client)).id
    store.add_event(job_id, WarningNotice(using="sdpa"), "flash_attention_2 unavailable: using sdpa")
    step = StepMetrics(step=1, epoch=1, loss=2.5, accuracy=0.25, valid_loss=2.7, valid_accuracy=0.2, grad_norm=0.5)
    store.add_event(job_id, step, "step 1/2 loss 2.5000")
    epoch_end = EpochEnd(epoch=1, step=2, loss=2.4, accuracy=0.3, eval_loss=2.6, eval_accuracy=0.28)
    store.add_event(job_id, epoch_end, "epoch 1/1 done, eval loss 2.6000")
    epoch, metrics, warning, queued = client.fine_tuning.jobs.list_events(job_id).data
    assert (metrics.type, metrics.level, metrics.data) == ("metrics", "info", {
        "step": 1, "train_loss": 2.5, "train_mean_token_accuracy": 0.25, "valid_loss": 2.7,
        "valid_mean_token_accuracy": 0.2, "epoch": 1, "grad_norm": 0.5})  # fmt: skip
    assert (warning.type, warning.level, warning.data) == ("message", "warn", {"event": "warning", "using": "sdpa"})
    assert epoch.data == {"event": "epoch", "epoch": 1, "step": 2, "loss": 2.4, "accuracy": 0.3, "eval_loss": 2.6,
                          "eval_accuracy": 0.28}  # fmt: skip
    assert (queued.message, queued.data) == ("Job queued", {"event": "status", "status": "queued"})
    after = client.fine_tuning.jobs.list_events(job_id, after=metrics.id).data
    assert [e.id for e in after] == [warning.id, queued.id]

    figures = {"train_loss": 2.4, "train_mean_token_accuracy": 0.3, "valid_loss": 2.7,
               "valid_mean_token_accuracy": 0.2, "full_valid_loss": 2.6, "full_valid_mean_token_accuracy": 0.28}  # fmt: skip
    folder = settings.volume.checkpoint(job_id, 2)
    folder.mkdir(parents=True)
    meta = CheckpointMeta.model_validate({"step": 2, "epoch": 1, **figures, "created_at": time.time()})
    (folder / CHECKPOINT_META).write_text(meta.model_dump_json())
    # A checkpoint.json written before the OpenAI names (`loss`, `eval_loss`) still reads, as what it was.
    legacy = settings.volume.checkpoint(job_id, 1)
    legacy.mkdir(parents=True)
    (legacy / CHECKPOINT_META).write_text(json.dumps({"step": 1, "epoch": 1, "loss": 2.9, "eval_loss": 3.1,
                                                      "created_at": time.time()}))  # fmt: skip
    ckpt, old = client.fine_tuning.jobs.checkpoints.list(job_id).data
    assert (ckpt.id, ckpt.step_number, ckpt.fine_tuned_model_checkpoint) == (
        f"ftckpt-{job_id}-step-000002",
        2,
        f"ft:some/model::{job_id}:ckpt-step-2",  # OpenAI's naming; the folder is in /jobs/{id}/checkpoints
    )
    assert ckpt.metrics.model_dump() == {"step": 2, **figures}
    assert old.metrics.model_dump() == {"step": 1, "train_loss": 2.9, "train_mean_token_accuracy": None,
                                        "valid_loss": None, "valid_mean_token_accuracy": None,
                                        "full_valid_loss": 3.1, "full_valid_mean_token_accuracy": None}  # fmt: skip


def test_the_results_csv_has_openais_header_and_a_blank_for_each_unknown() -> None:
    steps = [StepMetrics(step=1, epoch=1, loss=2.5, accuracy=0.125, valid_loss=2.75, valid_accuracy=0.1),
             StepMetrics(step=2, epoch=1, loss=1.0)]  # fmt: skip
    text = csv_text(steps)
    assert text.splitlines()[0] == "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy"
    rows = list(csv.reader(text.splitlines()[1:]))
    assert rows == [["1", "2.5", "0.125", "2.75", "0.1"], ["2", "1.0", "", "", ""]]
    assert count_rows(text) == 2 and count_rows(csv_text([])) == 0


def test_a_jobs_result_file_is_listed_on_it_and_served_until_deleted(
    client: OpenAI, settings: Settings, redis_client: redis.Redis
) -> None:
    upload_id = _upload(client)
    job_id = _create(client, upload_id).id
    path = settings.volume.step_metrics(job_id)
    assert register_results(redis_client, job_id, path) is None  # no file: nothing to register
    path.parent.mkdir(parents=True)
    path.write_text(csv_text([]))
    assert register_results(redis_client, job_id, path) is None  # a header alone: no step was logged
    assert client.fine_tuning.jobs.retrieve(job_id).result_files == []
    text = csv_text([StepMetrics(step=s, epoch=1, loss=3.0 - s, accuracy=0.1 * s) for s in (1, 2, 3)])
    path.write_text(text)
    file_id = register_results(redis_client, job_id, path)  # as the worker does when the job ends

    assert file_id == f"file-results-{job_id}"
    assert client.fine_tuning.jobs.retrieve(job_id).result_files == [file_id]
    assert [j.result_files for j in client.fine_tuning.jobs.list()] == [[file_id]]
    info = client.files.retrieve(file_id)
    assert (info.purpose, info.filename, info.bytes, info.object) == (
        "fine-tune-results", "step_metrics.csv", len(text), "file")  # fmt: skip
    content = client.files.content(file_id)
    assert content.content == text.encode() and content.response.headers["content-type"].startswith("text/csv")
    assert {f.id for f in client.files.list()} == {upload_id, file_id}
    assert [f.id for f in client.files.list(purpose="fine-tune-results")] == [file_id]
    assert [f.id for f in client.files.list(purpose="fine-tune")] == [upload_id]
    client.fine_tuning.jobs.cancel(job_id)  # frees the slot for the next refusal
    with pytest.raises(openai.BadRequestError) as not_data:  # metrics are not training data
        _create(client, file_id)
    assert not_data.value.param == "training_file" and "fine-tune-results" in not_data.value.message

    assert client.files.delete(file_id).deleted is True
    assert not path.exists() and client.fine_tuning.jobs.retrieve(job_id).result_files == []
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(file_id)
    with pytest.raises(openai.NotFoundError):
        client.files.content(file_id)
    assert [f.id for f in client.files.list()] == [upload_id]


def test_a_job_submitted_natively_is_listed_here_too(api: TestClient, client: OpenAI) -> None:
    files = {"config": (None, json.dumps({"epochs": 2})), "file": ("d.jsonl", jsonl(easy_records(2)))}
    job_id = api.post("/train", files=files).json()["job_id"]
    job = client.fine_tuning.jobs.retrieve(job_id)
    assert (job.training_file, job.hyperparameters.n_epochs, job.integrations) == (f"{job_id}.jsonl", 2, [])
    cancelled = client.fine_tuning.jobs.cancel(job_id)
    assert cancelled.status == "cancelled"


def test_refusals_come_in_openais_envelope_and_leave_nothing(
    client: OpenAI, settings: Settings, store: JobStore
) -> None:
    bad = jsonl(easy_records(1)) + b'{"oops": 1}\n'
    with pytest.raises(openai.BadRequestError) as bad_file:
        client.files.create(file=("bad.jsonl", bad), purpose="fine-tune")
    assert (bad_file.value.param, bad_file.value.code) == ("file", "invalid_file_format")
    assert "line 2: no known record shape: keys 'oops'" in bad_file.value.message
    assert isinstance(bad_file.value.body, dict) and bad_file.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as purpose:
        client.files.create(file=("d.jsonl", jsonl(easy_records(1))), purpose="assistants")  # type: ignore[arg-type]
    assert purpose.value.param == "purpose"
    assert client.files.list().data == [] and not [p for p in settings.volume.datasets.rglob("*") if p.is_file()]

    with pytest.raises(openai.NotFoundError) as no_job:
        client.fine_tuning.jobs.retrieve("job-nope")
    assert (no_job.value.code, no_job.value.param) == ("fine_tuning_job_not_found", "fine_tuning_job_id")
    assert "job-nope" in no_job.value.message
    for call in (client.fine_tuning.jobs.cancel, client.fine_tuning.jobs.list_events,
                 client.fine_tuning.jobs.checkpoints.list):  # fmt: skip
        with pytest.raises(openai.NotFoundError):
            call("job-nope")
    with pytest.raises(openai.NotFoundError) as no_file:
        client.files.retrieve("file-nope")
    assert no_file.value.code == "file_not_found"
    with pytest.raises(openai.BadRequestError) as unknown:
        _create(client, "file-nope")
    assert (unknown.value.param, unknown.value.code) == ("training_file", "invalid_file")

    file_id = _upload(client)
    with pytest.raises(openai.BadRequestError) as rft:
        _create(client, file_id, method={"type": "reinforcement"})
    assert (rft.value.param, rft.value.code) == ("method.type", "unsupported_method")
    assert rft.value.message.endswith(" - reinforcement fine-tuning is not supported; use supervised or dpo")
    for hyperparameters, param in [({"n_epochs": 0}, "hyperparameters.n_epochs"),
                                   ({"n_epochs": 100_000}, "hyperparameters.n_epochs"),
                                   ({"learning_rate_multiplier": 10_000}, "hyperparameters.learning_rate_multiplier")]:  # fmt: skip
        with pytest.raises(openai.BadRequestError) as refused:
            _create(client, file_id, hyperparameters=hyperparameters)
        assert refused.value.param == param
    # Nothing was admitted, linked or recorded for the refused jobs.
    assert client.fine_tuning.jobs.list().data == [] and store.current() is None
    assert [p.name for p in settings.volume.datasets.glob("*.jsonl")] == [f"{file_id}.jsonl"]

    running = _create(client, file_id)
    with pytest.raises(openai.BadRequestError) as cursor:
        client.fine_tuning.jobs.list_events(running.id, after="ftevent-x")
    assert cursor.value.param == "after" and "not an event id this API returned" in cursor.value.message
    waiting = _create(client, file_id)  # every slot taken: it waits in line instead of a 409
    assert (waiting.status, waiting.queue_position) == ("queued", 1)  # type: ignore[attr-defined]
    client.fine_tuning.jobs.cancel(waiting.id)
    client.fine_tuning.jobs.cancel(running.id)
    with pytest.raises(openai.BadRequestError) as ended:
        client.fine_tuning.jobs.cancel(running.id)
    assert ended.value.code == "job_already_ended"
    # Nothing was left for the refused jobs: only the uploaded file and the two jobs' copies of it.
    names = sorted(p.name for p in settings.volume.datasets.glob("*.jsonl"))
    assert names == sorted([f"{file_id}.jsonl", f"{running.id}.jsonl", f"{waiting.id}.jsonl"])


@pytest.mark.parametrize(
    ("failure", "code", "param"),
    [
        ("no worker picked up the job in time", "queue_timeout", None),
        ("worker lost: gpu-3:17 stopped renewing its lease", "worker_lost", None),
        ("ValueError: no example has an assistant token to train on", "invalid_training_file", "training_file"),
        ("OutOfMemoryError: CUDA out of memory", "out_of_memory", "hyperparameters.batch_size"),
        ("RuntimeError: something else", "training_failed", None),
    ],
)
def test_a_failed_jobs_error_says_what_kind_of_failure_it_was(
    client: OpenAI, store: JobStore, failure: str, code: str, param: str | None
) -> None:
    job = _create(client, _upload(client))
    assert store.abort(job.id, failure)
    failed = client.fine_tuning.jobs.retrieve(job.id)
    assert failed.status == "failed" and failed.error is not None
    assert (failed.error.code, failed.error.message, failed.error.param) == (code, failure, param)
    assert failed.fine_tuned_model is None and failed.finished_at is not None
