"""A webhook delivery's Standard Webhooks signature (what `openai.OpenAI().webhooks.unwrap` checks)."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from standardwebhooks import Webhook

from api.webhooks.events import WebhookEvent


def signed_request(event: WebhookEvent, secret: str, *, now: float | None = None) -> tuple[bytes, dict[str, str]]:
    """The body and headers of one delivery attempt, signed at `now` (receivers refuse stale timestamps, so
    each attempt is signed afresh)."""
    body = event.model_dump_json()
    seconds = int(time.time() if now is None else now)
    signature = Webhook(secret).sign(event.id, datetime.fromtimestamp(seconds, tz=UTC), body)
    headers = {
        "content-type": "application/json",
        "user-agent": "lora-server-webhooks",
        "webhook-id": event.id,
        "webhook-timestamp": str(seconds),
        "webhook-signature": signature,
    }
    return body.encode(), headers
