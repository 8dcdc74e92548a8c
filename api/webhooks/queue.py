"""Webhook deliveries in Redis: from the outbox to one pending delivery per receiver URL, claimed and settled.

The outbox (a list) is filled by the job transitions' own Lua scripts. Fanning out pops it and adds the
deliveries in one script, so an entry is never lost nor taken by two API processes. Pending deliveries
live in a zset scored by when they are next due; claiming one moves its score a lease into the future
(again one script), so a second dispatcher does not take it, and a dispatcher that dies mid-delivery
leaves it to be claimed again once the lease lapses. Deliveries are therefore at least once; receivers
drop repeats by the `webhook-id` header.
"""

from __future__ import annotations

import json
from typing import cast

import redis
from pydantic import BaseModel

from api.webhooks.events import OutboxEntry
from shared import keys

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: outbox, pending. ARGV: most entries to take, then each URL as a JSON string.
# The member is built by concatenation (the entry is JSON its producer wrote): a malformed one fails to
# parse in Python and is dropped there, instead of failing this script and wedging the outbox.
FAN_OUT = (
    _NOW
    + """
local taken = 0
for _ = 1, tonumber(ARGV[1]) do
  local entry = redis.call('LPOP', KEYS[1])
  if not entry then break end
  for j = 2, #ARGV do
    redis.call('ZADD', KEYS[2], 'NX', now, '{"url":' .. ARGV[j] .. ',"attempt":0,"entry":' .. entry .. '}')
  end
  taken = taken + 1
end
return taken
"""
)

# KEYS: pending. ARGV: most to claim, lease_ms. Returns the claimed members.
CLAIM = (
    _NOW
    + """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, member in ipairs(due) do
  redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), member)
end
return due
"""
)

# KEYS: pending. ARGV: claimed member, its next-attempt member, delay_ms.
# Only if the claimed one is still there: a dispatcher that already settled it is not undone.
RESCHEDULE = (
    _NOW
    + """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
return 1
"""
)


class Delivery(BaseModel):
    """One event for one receiver URL: a member of `keys.WEBHOOK_PENDING`."""

    url: str
    attempt: int = 0  # attempts made so far
    entry: OutboxEntry


class WebhookQueue:
    """Typed access to the outbox and the pending deliveries; members are passed back exactly as claimed."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._fan_out = client.register_script(FAN_OUT)
        self._claim = client.register_script(CLAIM)
        self._reschedule = client.register_script(RESCHEDULE)

    def fan_out(self, urls: list[str], *, batch: int = 500) -> int:
        """Turn up to `batch` outbox entries into deliveries due now, one per URL; returns entries taken.
        With no URL the entries are only removed: nobody is listening, and the outbox must not grow."""
        return int(
            cast(
                int,
                self._fan_out(
                    keys=[keys.WEBHOOK_OUTBOX, keys.WEBHOOK_PENDING], args=[batch, *(json.dumps(u) for u in urls)]
                ),
            )
        )

    def claim(self, *, limit: int, lease_s: float) -> list[str]:
        """Up to `limit` due deliveries, now held by the caller for `lease_s`."""
        if limit <= 0:
            return []
        return [
            str(m) for m in cast(list[str], self._claim(keys=[keys.WEBHOOK_PENDING], args=[limit, int(lease_s * 1000)]))
        ]

    def settle(self, member: str) -> None:
        """Delivered, or given up: the delivery is removed."""
        self.client.zrem(keys.WEBHOOK_PENDING, member)

    def reschedule(self, member: str, delivery: Delivery, *, delay_s: float) -> bool:
        """Replace a claimed delivery by its next attempt, due in `delay_s`."""
        return bool(
            self._reschedule(
                keys=[keys.WEBHOOK_PENDING], args=[member, delivery.model_dump_json(), int(delay_s * 1000)]
            )
        )

    def pending(self) -> list[tuple[str, float]]:
        """Every pending delivery with when it is due (ms): for tests and inspection."""
        rows = self.client.zrange(keys.WEBHOOK_PENDING, 0, -1, withscores=True)
        return [(str(m), float(s)) for m, s in cast(list[tuple[str, float]], rows)]
