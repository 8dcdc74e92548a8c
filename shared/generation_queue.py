"""The generation queue in Redis: its admission script, and the worker's side of it (pop a request,
send its events, notice a cancel, heartbeat). The API's side, asynchronous, is api.openai.generation.

Times that cross hosts (a request's deadline, heartbeats) are the Redis server's clock.
"""

from __future__ import annotations

import logging
import time
from typing import cast

import redis
from pydantic import ValidationError

from shared import keys
from shared.generation import STREAM_FIELD, GenerationDone, GenerationFailed, GenerationRequest, TextDelta

log = logging.getLogger(__name__)

# KEYS[1] the queue; ARGV[1] the most requests that may wait, ARGV[2] the request. 1: queued, 0: full.
# One script, so two API processes can never both squeeze past the bound.
ENQUEUE_SCRIPT = """
if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('RPUSH', KEYS[1], ARGV[2])
return 1
"""
HEARTBEAT_S = 5.0  # how often a generation worker reports itself alive
OUTPUT_GRACE_S = 60  # an output stream outlives its request's deadline by this much, then expires
CANCEL_TTL_S = 600  # a cancel flag outlives any request it can concern


def server_time(client: redis.Redis) -> float:
    seconds, micros = cast(tuple[int, int], client.time())
    return seconds + micros / 1e6


def generators_fresh_s() -> float:
    """How long a generation worker may be silent before the API stops counting on it."""
    return 3 * HEARTBEAT_S


def heartbeat(client: redis.Redis, name: str) -> None:
    client.zadd(keys.GENERATORS, {name: int(server_time(client) * 1000)})


def forget(client: redis.Redis, name: str) -> None:
    client.zrem(keys.GENERATORS, name)


def pop_request(client: redis.Redis, timeout_s: float) -> GenerationRequest | None:
    """The oldest pending request, waiting up to `timeout_s` for one; None when none came (or it was unreadable)."""
    item = cast(tuple[str, str] | None, client.blpop([keys.GENERATE_QUEUE], timeout=timeout_s))
    if item is None:
        return None
    try:
        return GenerationRequest.model_validate_json(item[1])
    except ValidationError as exc:  # not ours, or from an incompatible version: nobody can answer it
        log.error("dropping an unreadable generation request: %s", exc)
        return None


class OutputStream:
    """One request's way back to the API: events appended to its stream, which expires after use."""

    def __init__(self, client: redis.Redis, request: GenerationRequest) -> None:
        self.client = client
        self.key = keys.generation_output_key(request.id)
        self.cancel_key = keys.generation_cancel_key(request.id)
        self.ttl_s = max(1, int(request.deadline - server_time(client)) + OUTPUT_GRACE_S)

    def send(self, event: TextDelta | GenerationDone | GenerationFailed) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.xadd(self.key, {STREAM_FIELD: event.model_dump_json()})
        pipe.expire(self.key, self.ttl_s)
        pipe.execute()

    def cancelled(self) -> bool:
        return bool(self.client.exists(self.cancel_key))


def monotonic_deadline(client: redis.Redis, request: GenerationRequest) -> float:
    """The request's deadline on this host's monotonic clock (hosts' wall clocks may disagree)."""
    return time.monotonic() + (request.deadline - server_time(client))
