"""What a webhook is: the outbox entry a job's terminal transition writes, and the event sent for it in
OpenAI's fine-tuning webhook shape (signed for sending by `api.webhooks.signing`)."""

from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import BaseModel, ConfigDict

WebhookEventType = Literal["fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled"]
EndStatus = Literal["succeeded", "failed", "cancelled"]
_EVENT_TYPES: dict[EndStatus, WebhookEventType] = {
    "succeeded": "fine_tuning.job.succeeded",
    "failed": "fine_tuning.job.failed",
    "cancelled": "fine_tuning.job.cancelled",
}


class OutboxEntry(BaseModel):
    """One terminal transition, as the Lua script that made it pushed it to `keys.WEBHOOK_OUTBOX`."""

    model_config = ConfigDict(extra="ignore")

    event_id: str  # the id of the job's status event in its own stream (unique per job, not across jobs)
    job_id: str
    status: EndStatus
    created_at: float  # seconds since the epoch, the server's clock


class WebhookEventData(BaseModel):
    id: str  # the fine-tuning job's id


class WebhookEvent(BaseModel):
    """The body POSTed to a receiver: OpenAI's `fine_tuning.job.*` webhook event."""

    id: str  # evt_…; also the `webhook-id` header, the same on every retry so receivers can drop repeats
    object: Literal["event"] = "event"
    created_at: int  # when the job ended, seconds
    type: WebhookEventType
    data: WebhookEventData


def event_for(entry: OutboxEntry) -> WebhookEvent:
    # Derived, not random: a delivery retried (or redone after an API restart) carries the same event id.
    digest = hashlib.sha256(f"{entry.job_id}/{entry.event_id}".encode()).hexdigest()[:32]
    return WebhookEvent(
        id=f"evt_{digest}",
        created_at=int(entry.created_at),
        type=_EVENT_TYPES[entry.status],
        data=WebhookEventData(id=entry.job_id),
    )
