"""The generation queue's protocol in Redis, both sides of it.

The API pushes a request within the bound on waiting requests (one script), reads the request's
output stream as it grows, raises a cancel flag when nobody reads any more, and counts on a worker
only while its heartbeat is fresh. A worker pops a request, sends its events, notices a cancel, and
heartbeats. The worker's side is synchronous and runs here; the API's is asynchronous, so its part
here is what to send and how to read what comes back, which the API runs through its own client.

Times that cross hosts (a request's deadline, heartbeats) are the Redis server's clock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any, cast

import redis
from pydantic import ValidationError

from shared import keys
from shared.generation import (
    STREAM_FIELD,
    GenerationDone,
    GenerationFailed,
    GenerationRequest,
    TextDelta,
    parse_event,
)

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
READ_BLOCK_MS = 2000  # how long one read of an output stream waits for more
READ_COUNT = 256  # the most events one read of an output stream takes

Event = TextDelta | GenerationDone | GenerationFailed


def seconds_of(reply: Any) -> float:
    """A Redis TIME reply (seconds, microseconds) as seconds."""
    seconds, micros = cast(tuple[int, int], reply)
    return int(seconds) + int(micros) / 1e6


def server_time(client: redis.Redis) -> float:
    return seconds_of(client.time())


def generators_fresh_s() -> float:
    """How long a generation worker may be silent before the API stops counting on it."""
    return 3 * HEARTBEAT_S


def fresh_since_ms(now_s: float) -> int:
    """The oldest heartbeat (ms, a score in `keys.GENERATORS`) of a worker still counted on at server time `now_s`."""
    return int((now_s - generators_fresh_s()) * 1000)


# --------------------------------------------------------------------------- the API's side, without I/O


def enqueue_call(request: GenerationRequest, max_pending: int) -> tuple[list[str], list[int | str]]:
    """The KEYS and ARGV that run ENQUEUE_SCRIPT for `request`: queued unless `max_pending` already wait."""
    return [keys.GENERATE_QUEUE], [max_pending, request.model_dump_json()]


def fresh_workers_call(now_s: float) -> tuple[str, int, str]:
    """The ZCOUNT arguments that count the workers still counted on at server time `now_s`."""
    return keys.GENERATORS, fresh_since_ms(now_s), "+inf"


def cancel_flag(request_id: str) -> tuple[str, int]:
    """The cancel flag's key and expiry (s): set to any value, it stops the request, or skips it while queued."""
    return keys.generation_cancel_key(request_id), CANCEL_TTL_S


def is_last(event: Event) -> bool:
    """Whether `event` ends its request's output: a result or a failure, after any number of text deltas."""
    return not isinstance(event, TextDelta)


class OutputReader:
    """Reading one request's output stream from the start, a read (an XREAD) at a time."""

    def __init__(self, request: GenerationRequest) -> None:
        self.key = keys.generation_output_key(request.id)
        self.deadline = request.deadline
        self.last = "0-0"  # the id of the last entry read: XREAD this key after it

    def block_ms(self, now_s: float) -> int | None:
        """How long the next read may wait at server time `now_s`; None once the request's deadline passed."""
        remaining = self.deadline - now_s
        if remaining <= 0:
            return None
        return max(1, min(READ_BLOCK_MS, int(remaining * 1000)))

    def events(self, rows: Any) -> Iterator[Event]:
        """The events of one XREAD reply, in order; each entry counts as read once its event is taken."""
        for _, entries in rows or []:
            for entry_id, fields in entries:
                self.last = entry_id
                yield parse_event(fields[STREAM_FIELD])


# --------------------------------------------------------------------------- the worker's side


def heartbeat(client: redis.Redis, name: str) -> None:
    client.zadd(keys.GENERATORS, {name: int(server_time(client) * 1000)})


def forget(client: redis.Redis, name: str) -> None:
    client.zrem(keys.GENERATORS, name)


def reported_lately(client: redis.Redis, name: str) -> bool:
    """Whether the worker `name` heartbeat recently enough for the API to count on it."""
    score = client.zscore(keys.GENERATORS, name)
    return score is not None and float(cast(float, score)) >= fresh_since_ms(server_time(client))


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

    def send(self, event: Event) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.xadd(self.key, {STREAM_FIELD: event.model_dump_json()})
        pipe.expire(self.key, self.ttl_s)
        pipe.execute()

    def cancelled(self) -> bool:
        return bool(self.client.exists(self.cancel_key))


def monotonic_deadline(client: redis.Redis, request: GenerationRequest) -> float:
    """The request's deadline on this host's monotonic clock (hosts' wall clocks may disagree)."""
    return time.monotonic() + (request.deadline - server_time(client))
