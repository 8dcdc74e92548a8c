"""`POST /v1/chat/completions`: chat with a base model, a fine-tuned model or a checkpoint.

The API only resolves the model name (api.openai.catalog), checks the request and relays: the request
goes onto the generation queue, a generation worker on a GPU host generates it (worker.generation.server),
and its text comes back on a Redis stream, relayed as one completion or as OpenAI's server-sent
`chat.completion.chunk` events ending with `data: [DONE]`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.deps import SettingsDep, StoreDep
from api.errors import GenerationFailed as GenerationFailedError
from api.errors import GenerationTimedOut, InvalidInput, ModelNotFound, ServiceError, UnsupportedParameter, field_error
from api.openai.catalog import resolve
from api.openai.chat_schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionCreate,
    Choice,
    ChunkChoice,
    Delta,
    Usage,
)
from api.openai.errors import OpenAIRoute, openai_response
from api.openai.generation import GenerationQueueDep
from api.openai.store import OpenAIStoreDep
from shared.generation import ChatMessage, GenerationDone, GenerationFailed, GenerationRequest, SamplingSpec, TextDelta
from shared.settings import Settings

router = APIRouter(prefix="/v1/chat", tags=["openai"], route_class=OpenAIRoute)


def _max_tokens(body: ChatCompletionCreate, settings: Settings) -> int:
    asked, param = (body.max_completion_tokens, "max_completion_tokens")
    if asked is None:
        asked, param = (body.max_tokens, "max_tokens")
    limit = settings.generation_max_tokens
    if asked is not None and asked > limit:
        msg = (
            f"{param} is {asked}; this server generates at most {limit} tokens per request (LORA_GENERATION_MAX_TOKENS)"
        )
        raise InvalidInput(msg, problems=[field_error([param], f"at most {limit}")])
    return asked or limit


def _check(body: ChatCompletionCreate, settings: Settings) -> SamplingSpec:
    for name in body.unsupported():
        raise UnsupportedParameter(name, "chat completions")
    if body.stream_options is not None and not body.stream:
        raise InvalidInput("stream_options is only allowed with stream=true",
                           problems=[field_error(["stream_options"], "needs stream=true")])  # fmt: skip
    return SamplingSpec(
        max_tokens=_max_tokens(body, settings),
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=body.stops,
        seed=body.seed,
    )


def _failure(event: GenerationFailed, model: str) -> ServiceError:
    if event.code == "model_not_found":
        return ModelNotFound(model, f" on the generation worker ({event.message})")
    if event.code == "invalid_request":
        return InvalidInput(event.message, problems=[field_error(["messages"], event.message)])
    if event.code in ("timeout", "cancelled"):
        return GenerationTimedOut(f"the completion was stopped: {event.message}")
    return GenerationFailedError(f"generation failed: {event.message}")


@router.post(
    "/completions",
    response_model=None,
    max_body_size=1024 * 1024,
    responses={400: {}, 404: {}, 429: {}, 503: {}, 504: {}},
)
async def create_chat_completion(
    body: ChatCompletionCreate,
    store: StoreDep,
    ostore: OpenAIStoreDep,
    settings: SettingsDep,
    queue: GenerationQueueDep,
) -> ChatCompletion | StreamingResponse:
    """Answer `messages` with `model`: a base model in use, a succeeded job's `ft:` name or job id, or a
    checkpoint's `ft:...:ckpt-step-N` name (`GET /v1/models` lists them)."""
    sampling = _check(body, settings)
    served = await run_in_threadpool(resolve, store, ostore, settings, body.model)
    await queue.check_workers()
    request = GenerationRequest(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        base_model=served.base_model,
        adapter_path=served.adapter_path,
        volume_base=str(settings.base_path.resolve()),
        messages=[
            ChatMessage(role="system" if m.role == "developer" else m.role, content=m.text) for m in body.messages
        ],
        sampling=sampling,
        deadline=await queue.server_time() + settings.generation_timeout_s,
    )
    await queue.submit(request)
    created = int(time.time())
    events = queue.events(request)
    if body.stream:
        # The first event is awaited here, so a request that fails before any text (a timeout, a model
        # the worker cannot load) is an ordinary error response rather than a broken stream.
        try:
            first = await anext(events)
        except BaseException:
            await events.aclose()
            raise
        if isinstance(first, GenerationFailed):
            await events.aclose()
            raise _failure(first, body.model)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = _sse(first, events, ChunkMaker(request.id, created, body.model), include_usage)
        return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    text: list[str] = []
    try:
        async for event in events:
            if isinstance(event, TextDelta):
                text.append(event.text)
            elif isinstance(event, GenerationFailed):
                raise _failure(event, body.model)
            else:
                message = AssistantMessage(content="".join(text))
                return ChatCompletion(
                    id=request.id,
                    created=created,
                    model=body.model,
                    choices=[Choice(message=message, finish_reason=event.finish_reason)],
                    usage=_usage(event),
                )
    finally:
        await events.aclose()
    raise GenerationFailedError("the generation worker ended the stream without an answer")


def _usage(done: GenerationDone) -> Usage:
    return Usage(
        prompt_tokens=done.prompt_tokens,
        completion_tokens=done.completion_tokens,
        total_tokens=done.prompt_tokens + done.completion_tokens,
    )


class ChunkMaker:
    def __init__(self, completion_id: str, created: int, model: str) -> None:
        self.id, self.created, self.model = completion_id, created, model

    def __call__(self, choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        chunk = ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)
        return f"data: {chunk.model_dump_json()}\n\n"


async def _sse(
    first: TextDelta | GenerationDone | GenerationFailed,
    rest: AsyncGenerator[TextDelta | GenerationDone | GenerationFailed, None],
    chunk: ChunkMaker,
    include_usage: bool,
) -> AsyncIterator[str]:
    try:
        async for piece in _chunks(first, rest, chunk, include_usage):
            yield piece
    finally:  # also when the client went away mid-stream: the worker is told to stop
        await rest.aclose()


async def _chunks(
    first: TextDelta | GenerationDone | GenerationFailed,
    rest: AsyncGenerator[TextDelta | GenerationDone | GenerationFailed, None],
    chunk: ChunkMaker,
    include_usage: bool,
) -> AsyncIterator[str]:
    yield chunk([ChunkChoice(delta=Delta(role="assistant", content=""))])
    event = first
    while True:
        if isinstance(event, TextDelta):
            yield chunk([ChunkChoice(delta=Delta(content=event.text))])
        elif isinstance(event, GenerationDone):
            yield chunk([ChunkChoice(delta=Delta(), finish_reason=event.finish_reason)])
            if include_usage:
                yield chunk([], _usage(event))
            yield "data: [DONE]\n\n"
            return
        else:
            yield _error_event(_failure(event, chunk.model))
            return
        try:
            event = await anext(rest)
        except ServiceError as exc:  # a timeout after the stream began: OpenAI's error event, then the end
            yield _error_event(exc)
            return
        except StopAsyncIteration:
            return


def _error_event(exc: ServiceError) -> str:
    body = json.loads(bytes(openai_response(exc).body))
    return f"data: {json.dumps(body)}\n\n"
