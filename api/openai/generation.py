"""The API's client of the generation queue (asynchronous: a request may wait minutes for its tokens
without holding a thread): the protocol of `shared.generation_queue` run over an asyncio Redis client,
with its outcomes mapped to the API's errors.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Annotated, Any, cast

import anyio
import redis.asyncio as aioredis
from fastapi import Depends, Request

from api.errors import GenerationQueueFull, GenerationTimedOut, GenerationUnavailable
from shared import generation_queue as gq
from shared.generation import GenerationRequest
from shared.settings import Settings


def connect_async(url: str) -> aioredis.Redis:
    # The socket timeout is above one read's wait, so a read that waits its full time is not cut short.
    return aioredis.Redis.from_url(
        url, decode_responses=True, socket_timeout=gq.READ_BLOCK_MS / 1000 + 5, socket_connect_timeout=5
    )


class GenerationQueue:
    def __init__(self, client: aioredis.Redis, settings: Settings) -> None:
        self.client, self.settings = client, settings
        self._enqueue = client.register_script(gq.ENQUEUE_SCRIPT)

    async def server_time(self) -> float:
        return gq.seconds_of(await self.client.time())

    async def check_workers(self) -> None:
        """GenerationUnavailable when no generation worker has reported lately: nothing would answer."""
        if not await self.client.zcount(*gq.fresh_workers_call(await self.server_time())):
            raise GenerationUnavailable(
                "no generation worker is running (start `python -m worker.generation` next to a training "
                "worker; `lora-server` and docker compose start one)"
            )

    async def submit(self, request: GenerationRequest) -> None:
        queue_keys, args = gq.enqueue_call(request, self.settings.generation_max_pending)
        if not await self._enqueue(keys=queue_keys, args=args):
            raise GenerationQueueFull(self.settings.generation_max_pending)

    async def events(self, request: GenerationRequest) -> AsyncGenerator[gq.Event, None]:
        """The request's events as the worker sends them, up to its last; GenerationTimedOut past its deadline.
        Leaving early (the client went away, or a timeout) cancels the request so the worker stops."""
        reader = gq.OutputReader(request)
        finished = False
        try:
            while True:
                block = reader.block_ms(await self.server_time())
                if block is None:
                    raise GenerationTimedOut(
                        f"the completion did not finish within {self.settings.generation_timeout_s:g} s "
                        "(LORA_GENERATION_TIMEOUT_S)"
                    )
                rows = cast(
                    list[Any], await self.client.xread({reader.key: reader.last}, block=block, count=gq.READ_COUNT)
                )
                for event in reader.events(rows):
                    yield event
                    if gq.is_last(event):
                        finished = True
                        return
        finally:
            # Shielded: when the client went away this runs inside a cancelled scope, where any await would fail.
            with anyio.CancelScope(shield=True):
                if not finished:
                    await self.cancel(request.id)
                await self.client.delete(reader.key)

    async def cancel(self, request_id: str) -> None:
        # Also when it is still waiting in the queue: the worker that pops it skips it.
        key, ttl_s = gq.cancel_flag(request_id)
        await self.client.set(key, "1", ex=ttl_s)


def _queue(request: Request) -> GenerationQueue:
    queue: GenerationQueue = request.app.state.generation
    return queue


GenerationQueueDep = Annotated[GenerationQueue, Depends(_queue)]
