"""The API's side of the generation queue (asynchronous: a request may wait minutes for its tokens
without holding a thread): enqueue within the bound, read the request's output stream as it grows,
and cancel what nobody reads any more. The worker's side is shared.generation_queue.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Annotated, Any, cast

import anyio
import redis.asyncio as aioredis
from fastapi import Depends, Request

from api.errors import GenerationQueueFull, GenerationTimedOut, GenerationUnavailable
from shared import keys
from shared.generation import STREAM_FIELD, GenerationDone, GenerationFailed, GenerationRequest, TextDelta, parse_event
from shared.generation_queue import CANCEL_TTL_S, ENQUEUE_SCRIPT, generators_fresh_s
from shared.settings import Settings

READ_BLOCK_MS = 2000  # one XREAD's wait; the client's socket timeout is above it


def connect_async(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        url, decode_responses=True, socket_timeout=READ_BLOCK_MS / 1000 + 5, socket_connect_timeout=5
    )


class GenerationQueue:
    def __init__(self, client: aioredis.Redis, settings: Settings) -> None:
        self.client, self.settings = client, settings
        self._enqueue = client.register_script(ENQUEUE_SCRIPT)

    async def server_time(self) -> float:
        seconds, micros = cast(tuple[int, int], await self.client.time())
        return seconds + micros / 1e6

    async def check_workers(self) -> None:
        """GenerationUnavailable when no generation worker has reported lately: nothing would answer."""
        low = int((await self.server_time() - generators_fresh_s()) * 1000)
        if not await self.client.zcount(keys.GENERATORS, low, "+inf"):
            raise GenerationUnavailable(
                "no generation worker is running (start `python -m worker.generation` next to a training "
                "worker; `lora-server` and docker compose start one)"
            )

    async def submit(self, request: GenerationRequest) -> None:
        added = await self._enqueue(
            keys=[keys.GENERATE_QUEUE], args=[self.settings.generation_max_pending, request.model_dump_json()]
        )
        if not added:
            raise GenerationQueueFull(self.settings.generation_max_pending)

    async def events(
        self, request: GenerationRequest
    ) -> AsyncGenerator[TextDelta | GenerationDone | GenerationFailed, None]:
        """The request's events as the worker sends them, up to its last; GenerationTimedOut past its deadline.
        Leaving early (the client went away, or a timeout) cancels the request so the worker stops."""
        stream = keys.generation_output_key(request.id)
        last = "0-0"
        finished = False
        try:
            while True:
                remaining = request.deadline - await self.server_time()
                if remaining <= 0:
                    raise GenerationTimedOut(
                        f"the completion did not finish within {self.settings.generation_timeout_s:g} s "
                        "(LORA_GENERATION_TIMEOUT_S)"
                    )
                block = max(1, min(READ_BLOCK_MS, int(remaining * 1000)))
                rows = cast(list[Any], await self.client.xread({stream: last}, block=block, count=256))
                for _, entries in rows:
                    for entry_id, fields in entries:
                        last = entry_id
                        event = parse_event(fields[STREAM_FIELD])
                        yield event
                        if not isinstance(event, TextDelta):
                            finished = True
                            return
        finally:
            # Shielded: when the client went away this runs inside a cancelled scope, where any await would fail.
            with anyio.CancelScope(shield=True):
                if not finished:
                    await self.cancel(request.id)
                await self.client.delete(stream)

    async def cancel(self, request_id: str) -> None:
        # Also when it is still waiting in the queue: the worker that pops it skips it.
        await self.client.set(keys.generation_cancel_key(request_id), "1", ex=CANCEL_TTL_S)


def _queue(request: Request) -> GenerationQueue:
    queue: GenerationQueue = request.app.state.generation
    return queue


GenerationQueueDep = Annotated[GenerationQueue, Depends(_queue)]
