"""Reading a streamed `/v1/chat/completions` on the client's side; `/v1/models` is read with the API's
own models (shared.models_api), re-exported here.

The chunks are read with lenient models of their own (OpenAI's field names, unknown fields ignored):
a failure after the stream began comes as a chunk of another shape, `{"error": {...}}`, which the
API's strict chunk model does not describe.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from pydantic import BaseModel, Field

from shared.models_api import ModelList, ModelPublic

__all__ = ["ChatCompletionChunk", "ChatStreamError", "ModelList", "ModelPublic", "chat_messages", "chunk_texts"]

DONE = "[DONE]"  # the data of the last event of an OpenAI stream


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
