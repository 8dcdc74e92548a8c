"""The webhook dispatcher: a background task of the API that sends each ended job's webhook to every
configured receiver, retrying with backoff.

It runs beside the requests and never in their way: Redis calls go to the default executor (not the
request threads' pool), and every delivery is a task of its own with a timeout, so a slow or dead
receiver delays neither the API, the workers, nor the other receivers.
"""

from __future__ import annotations

import asyncio
import logging
import random

import httpx
import redis
from pydantic import ValidationError

from api.webhooks.events import event_for
from api.webhooks.queue import Delivery, WebhookQueue
from api.webhooks.signing import signed_request
from shared.settings import Settings

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 32  # deliveries sent at once; the rest wait in Redis, still due


def retry_delay_s(settings: Settings, attempts_made: int) -> float:
    """Exponential backoff with jitter (half to all of the doubled delay), so that receivers coming back
    from an outage are not hit by every retry at once."""
    return settings.webhook_retry_base_s * 2 ** (attempts_made - 1) * random.uniform(0.5, 1.0)


class WebhookDispatcher:
    def __init__(self, queue: WebhookQueue, settings: Settings) -> None:
        self.queue = queue
        self.settings = settings
        self.secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else ""
        self._tasks: set[asyncio.Task[None]] = set()
        # A claim outlives the longest attempt, so another dispatcher never takes a delivery still being sent.
        self._lease_s = settings.webhook_timeout_s + 60.0

    async def run(self) -> None:
        """Forever: fan out new events, start the due deliveries; Redis outages are waited out."""
        async with httpx.AsyncClient(timeout=self.settings.webhook_timeout_s) as http:
            try:
                while True:
                    try:
                        await self.tick(http)
                    except redis.ConnectionError as exc:
                        log.debug("webhooks: %s", exc)
                    except Exception:
                        log.warning("webhook dispatch failed", exc_info=True)
                    await asyncio.sleep(self.settings.webhook_poll_interval_s)
            finally:
                # Unfinished deliveries stay claimed in Redis and are taken up again when their lease lapses.
                for task in self._tasks:
                    task.cancel()

    async def tick(self, http: httpx.AsyncClient) -> None:
        await asyncio.to_thread(self.queue.fan_out, self.settings.webhook_url)
        members = await asyncio.to_thread(
            self.queue.claim, limit=MAX_IN_FLIGHT - len(self._tasks), lease_s=self._lease_s
        )
        for member in members:
            task = asyncio.create_task(self._deliver(http, member))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _deliver(self, http: httpx.AsyncClient, member: str) -> None:
        try:
            delivery = Delivery.model_validate_json(member)
        except ValidationError as exc:
            log.error("webhook delivery dropped: unreadable %r: %s", member[:500], exc)
            await asyncio.to_thread(self.queue.settle, member)
            return
        if delivery.url not in self.settings.webhook_url:
            # The receiver was taken out of LORA_WEBHOOK_URL since the event was fanned out.
            log.warning("webhook for job %s to %s dropped: no longer configured", delivery.entry.job_id, delivery.url)
            await asyncio.to_thread(self.queue.settle, member)
            return
        error = await self._post(http, delivery)
        if error is None:
            await asyncio.to_thread(self.queue.settle, member)
            return
        attempts = delivery.attempt + 1
        event = event_for(delivery.entry)
        if attempts >= self.settings.webhook_max_attempts:
            log.error(
                "webhook %s (%s, job %s) to %s dropped after %d attempts; last: %s",
                event.id, event.type, delivery.entry.job_id, delivery.url, attempts, error,
            )  # fmt: skip
            await asyncio.to_thread(self.queue.settle, member)
            return
        delay = retry_delay_s(self.settings, attempts)
        log.info(
            "webhook %s to %s failed (%s); attempt %d in %.1f s", event.id, delivery.url, error, attempts + 1, delay
        )
        await asyncio.to_thread(
            self.queue.reschedule, member, delivery.model_copy(update={"attempt": attempts}), delay_s=delay
        )

    async def _post(self, http: httpx.AsyncClient, delivery: Delivery) -> str | None:
        """None when the receiver took it (any 2xx), else why not."""
        body, headers = signed_request(event_for(delivery.entry), self.secret)
        try:
            response = await http.post(delivery.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        if response.is_success:
            return None
        return f"HTTP {response.status_code}"
