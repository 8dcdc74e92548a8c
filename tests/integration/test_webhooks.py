"""Webhooks from the real service (API, Celery worker, Redis) to a real HTTP receiver, verified the way an
OpenAI user verifies them: `client.webhooks.unwrap` with the shared secret.

(Signing, retries and receiver isolation are tests/api/test_webhooks.py's, in process.)
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI
from openai.types.webhooks import UnwrapWebhookEvent

from launcher.embedded_redis import free_port
from tests.data import easy_records, jsonl
from tests.service import ROOT, Service, flush, submit, wait_running, wait_until
from tests.webhook_receiver import Receiver, webhook_receiver

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with webhook_receiver() as r:
        yield r


@pytest.fixture
def service(tmp_path: Path, redis_url: str, tiny_model_dir: Path, receiver: Receiver) -> Iterator[Service]:
    """The service with LORA_WEBHOOK_URL pointing at the receiver."""
    flush(redis_url)
    env = {"LORA_WEBHOOK_URL": receiver.url, "LORA_WEBHOOK_SECRET": SECRET, "LORA_WEBHOOK_POLL_INTERVAL_S": "0.2"}
    svc = Service(base_path=tmp_path / "base", redis_url=redis_url, log_dir=tmp_path / "logs", env_extra=env)
    svc.start()
    try:
        yield svc
    finally:
        svc.stop()


@pytest.fixture
def client(service: Service) -> Iterator[OpenAI]:
    with OpenAI(base_url=service.url + "/v1", api_key="any-key", max_retries=0, timeout=60) as c:
        yield c


def _webhook_for(client: OpenAI, receiver: Receiver, service: Service, job_id: str) -> UnwrapWebhookEvent:
    """The one verified event the receiver got for `job_id`."""

    def arrived() -> list[UnwrapWebhookEvent]:
        events = [client.webhooks.unwrap(r.body, r.headers, secret=SECRET) for r in receiver.accepted()]
        return [e for e in events if e.data.id == job_id]  # type: ignore[union-attr]

    [event] = wait_until(arrived, timeout=60, what=lambda: f"{job_id}'s webhook\n{service.logs('api')}")
    return event


def test_openai_jobs_send_succeeded_and_cancelled_webhooks(
    client: OpenAI, service: Service, receiver: Receiver, tiny_model_dir: Path
) -> None:
    file_id = client.files.create(file=("t.jsonl", jsonl(easy_records(8))), purpose="fine-tune").id
    done = client.fine_tuning.jobs.create(
        model=str(tiny_model_dir), training_file=file_id, hyperparameters={"n_epochs": 1, "batch_size": 4}
    )
    event = _webhook_for(client, receiver, service, done.id)
    assert event.type == "fine_tuning.job.succeeded"
    job = client.fine_tuning.jobs.retrieve(done.id)
    assert job.status == "succeeded" and job.finished_at is not None and event.created_at == job.finished_at

    long = client.fine_tuning.jobs.create(
        model=str(tiny_model_dir), training_file=file_id, hyperparameters={"n_epochs": 10_000, "batch_size": 1}
    )
    wait_running(service, long.id)
    client.fine_tuning.jobs.cancel(long.id)
    assert _webhook_for(client, receiver, service, long.id).type == "fine_tuning.job.cancelled"
    assert client.fine_tuning.jobs.retrieve(long.id).status == "cancelled"
    # One delivery per ending, each accepted at once: nothing was sent twice.
    assert len(receiver.received) == 2 and len({r.headers["webhook-id"] for r in receiver.received}) == 2


def test_a_native_train_job_sends_its_webhook(
    client: OpenAI, service: Service, receiver: Receiver, tiny_model_dir: Path
) -> None:
    r = submit(service, tiny_model_dir)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    assert _webhook_for(client, receiver, service, job_id).type == "fine_tuning.job.succeeded"
    assert service.job(job_id)["status"] == "succeeded"


@pytest.mark.parametrize(
    ("env", "said"),
    [({"LORA_WEBHOOK_URL": "http://127.0.0.1:9/hook"}, "LORA_WEBHOOK_URL is set but LORA_WEBHOOK_SECRET is not"),
     ({"LORA_WEBHOOK_URL": "http://127.0.0.1:9/hook", "LORA_WEBHOOK_SECRET": "whsec_c2hvcnQ="}, "holds 5 bytes")],
    ids=["no-secret", "short-secret"],
)  # fmt: skip
def test_the_one_command_service_refuses_a_bad_webhook_configuration(
    tmp_path: Path, env: dict[str, str], said: str
) -> None:
    full = {k: v for k, v in os.environ.items() if not k.startswith("LORA_")} | env | {"PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "cli", "--base_path", str(tmp_path / "models"), "--port", str(free_port())]
    done = subprocess.run(cmd, cwd=ROOT, env=full, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and said in done.stderr, done.stderr
    assert "c2hvcnQ" not in done.stderr  # the secret is not logged
    assert not (tmp_path / "models").exists()  # nothing was started
