"""The webhook event as sent: its shape, and its signature as both verifiers check it."""

from __future__ import annotations

import base64
import json
import os
import time

import openai
import pytest
from openai import OpenAI
from standardwebhooks import Webhook, WebhookVerificationError

from api.webhooks.events import OutboxEntry, event_for
from api.webhooks.signing import signed_request

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()


def _entry(status: str = "succeeded", job_id: str = "job-abc123", event_id: str = "1733150000000-0") -> OutboxEntry:
    return OutboxEntry.model_validate(
        {"event_id": event_id, "job_id": job_id, "status": status, "created_at": 1733150000.789}
    )


def test_the_body_is_openais_fine_tuning_event_shape() -> None:
    body, headers = signed_request(event_for(_entry("failed")), SECRET)
    sent = json.loads(body)
    assert set(sent) == {"id", "object", "created_at", "type", "data"}
    assert sent["id"].startswith("evt_") and sent["object"] == "event"
    assert sent["created_at"] == 1733150000 and isinstance(sent["created_at"], int)
    assert sent["type"] == "fine_tuning.job.failed" and sent["data"] == {"id": "job-abc123"}
    assert headers["webhook-id"] == sent["id"] and headers["content-type"] == "application/json"


def test_the_event_id_is_stable_per_transition_and_distinct_across_jobs() -> None:
    assert event_for(_entry()).id == event_for(_entry()).id  # a retry carries the same id
    assert event_for(_entry()).id != event_for(_entry(job_id="job-other")).id  # stream ids repeat across jobs
    assert event_for(_entry()).id != event_for(_entry(event_id="1733150000000-1")).id


@pytest.mark.parametrize("status", ["succeeded", "failed", "cancelled"])
def test_the_signature_verifies_with_standardwebhooks_and_the_openai_client(status: str) -> None:
    body, headers = signed_request(event_for(_entry(status)), SECRET)
    assert Webhook(SECRET).verify(body, headers)["type"] == f"fine_tuning.job.{status}"
    with OpenAI(api_key="unused", base_url="http://127.0.0.1:9") as client:
        event = client.webhooks.unwrap(body, headers, secret=SECRET)
    assert event.type == f"fine_tuning.job.{status}"
    assert event.data.id == "job-abc123"  # type: ignore[union-attr]


def test_a_wrong_secret_tampered_body_or_stale_timestamp_does_not_verify() -> None:
    body, headers = signed_request(event_for(_entry()), SECRET)
    other = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    client = OpenAI(api_key="unused", base_url="http://127.0.0.1:9")
    with pytest.raises(openai.InvalidWebhookSignatureError):
        client.webhooks.unwrap(body, headers, secret=other)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        client.webhooks.unwrap(body.replace(b"job-abc123", b"job-abc124"), headers, secret=SECRET)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body.replace(b"job-abc123", b"job-abc124"), headers)
    old_body, old_headers = signed_request(event_for(_entry()), SECRET, now=time.time() - 3600)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        client.webhooks.unwrap(old_body, old_headers, secret=SECRET)
    client.close()
