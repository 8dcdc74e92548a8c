"""shared.generation_queue: the API's side of the protocol (here over a plain client) and the worker's
side agree: a request pushed within the bound is popped, its events read back in order up to the last,
a cancel flag is seen, and a worker counts only while its heartbeat is fresh."""

from __future__ import annotations

from typing import Any, cast

import redis

from shared import generation_queue as gq
from shared.generation import ChatMessage, GenerationDone, GenerationRequest, SamplingSpec, TextDelta


def _request(client: redis.Redis, request_id: str = "req-1") -> GenerationRequest:
    return GenerationRequest(
        id=request_id,
        base_model="tiny",
        messages=[ChatMessage(role="user", content="hi")],
        sampling=SamplingSpec(max_tokens=4),
        deadline=gq.server_time(client) + 30,
    )


def test_a_request_is_queued_within_the_bound_and_popped_as_sent(redis_client: redis.Redis) -> None:
    enqueue = redis_client.register_script(gq.ENQUEUE_SCRIPT)
    first, second = _request(redis_client, "req-1"), _request(redis_client, "req-2")
    for request, queued in ((first, 1), (second, 0)):
        queue_keys, args = gq.enqueue_call(request, max_pending=1)
        assert enqueue(keys=queue_keys, args=args) == queued
    assert gq.pop_request(redis_client, 0.1) == first
    assert gq.pop_request(redis_client, 0.1) is None


def test_the_output_stream_reads_back_in_order_up_to_the_last_event(redis_client: redis.Redis) -> None:
    request = _request(redis_client)
    out = gq.OutputStream(redis_client, request)
    sent = [
        TextDelta(text="a"),
        TextDelta(text="b"),
        GenerationDone(finish_reason="stop", prompt_tokens=3, completion_tokens=2),
    ]
    reader = gq.OutputReader(request)
    out.send(sent[0])
    block = reader.block_ms(gq.server_time(redis_client))
    assert block is not None and 0 < block <= gq.READ_BLOCK_MS
    got = list(
        reader.events(cast(Any, redis_client.xread({reader.key: reader.last}, block=block, count=gq.READ_COUNT)))
    )
    for event in sent[1:]:
        out.send(event)
    got += list(
        reader.events(cast(Any, redis_client.xread({reader.key: reader.last}, block=block, count=gq.READ_COUNT)))
    )
    assert got == sent  # the second read starts after what the first took
    assert [gq.is_last(e) for e in got] == [False, False, True]
    assert reader.block_ms(request.deadline + 1) is None  # past the deadline: no more waiting


def test_a_cancel_flag_is_seen_by_the_worker(redis_client: redis.Redis) -> None:
    request = _request(redis_client)
    out = gq.OutputStream(redis_client, request)
    assert not out.cancelled()
    key, ttl_s = gq.cancel_flag(request.id)
    redis_client.set(key, "1", ex=ttl_s)
    assert out.cancelled()


def test_a_worker_counts_while_its_heartbeat_is_fresh(redis_client: redis.Redis) -> None:
    now = gq.server_time(redis_client)
    assert redis_client.zcount(*gq.fresh_workers_call(now)) == 0 and not gq.reported_lately(redis_client, "w1")
    gq.heartbeat(redis_client, "w1")
    assert redis_client.zcount(*gq.fresh_workers_call(gq.server_time(redis_client))) == 1
    assert gq.reported_lately(redis_client, "w1")
    later = gq.server_time(redis_client) + gq.generators_fresh_s() + 1
    assert redis_client.zcount(*gq.fresh_workers_call(later)) == 0
    gq.forget(redis_client, "w1")
    assert not gq.reported_lately(redis_client, "w1")
