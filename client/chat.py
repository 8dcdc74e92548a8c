"""What the client reads from the OpenAI-compatible chat surface: `/v1/models` and the chunks of a
streamed `/v1/chat/completions`.

Parsed on the client's side with models of its own (OpenAI's field names), so the client depends on
the wire format only, not on the server's modules. Unknown fields are ignored: a server may add more.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from pydantic import BaseModel, Field

DONE = "[DONE]"  # the data of the last event of an OpenAI stream


class ModelPublic(BaseModel):
    """One model a chat completion may name: a base model, or a job's `ft:` name."""

    id: str
    object: str = "model"
    created: int | None = None
    owned_by: str | None = None


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelPublic]


class ChunkDelta(BaseModel):
    role: str | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta = Field(default_factory=ChunkDelta)
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    """One `data:` line of a streamed chat completion; `error` when the server failed mid-stream."""

    id: str | None = None
    model: str | None = None
    choices: list[ChunkChoice] = Field(default_factory=list)
    error: dict[str, Any] | None = None


class ChatStreamError(Exception):
    """The server started answering, then reported a failure inside the stream."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def chat_messages(question: str, system: str | None = None) -> list[dict[str, str]]:
    """The messages of a one-question chat, with the system prompt first when there is one."""
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": question}]


def chunk_texts(events: Iterable[tuple[str, str]]) -> Iterator[str]:
    """The answer's text pieces from (event type, data) pairs of a chat completion stream, until `[DONE]`.

    ChatStreamError when a chunk carries an error (the HTTP status was already 200 by then), or when the
    stream ends without `[DONE]` (a dropped connection: the answer may be cut short).
    """
    for _, data in events:
        if data.strip() == DONE:
            return
        chunk = ChatCompletionChunk.model_validate_json(data)
        if chunk.error is not None:
            raise ChatStreamError(str(chunk.error.get("message") or chunk.error), chunk.error.get("code"))
        for choice in chunk.choices:
            if choice.delta.content:
                yield choice.delta.content
    raise ChatStreamError("the answer stream ended before its end ([DONE]); the answer may be cut short")
