"""Reading a streamed `/v1/chat/completions` on the client's side; `/v1/models` is read with the API's
own models (shared.models_api), re-exported here.

The chunks are read with lenient models of their own (OpenAI's field names, unknown fields ignored):
a failure after the stream began comes as a chunk of another shape, `{"error": {...}}`, which the
API's strict chunk model does not describe.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

from pydantic import BaseModel, Field

from shared.models_api import ModelList, ModelPublic

__all__ = [
    "ChatCompletionChunk",
    "ChatStreamError",
    "ModelList",
    "ModelPublic",
    "TerminalStream",
    "chat_messages",
    "chunk_texts",
    "terminal_safe",
]

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


# A model's answer is untrusted text: written raw to a terminal, an escape sequence could recolour it, move
# the cursor, retitle the window, rewrite what was printed (\r, backspace), ring the bell or, on some
# terminals, do worse. Whole ANSI sequences go (CSI `ESC [ ... final`, OSC `ESC ] ... BEL|ESC \`, the
# one-character C1 forms, two-character `ESC x`), then every other C0/C1 control but newline and tab, and
# the bidirectional overrides that make text read other than it is stored.
_ANSI = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"  # CSI
    r"|(?:\x1b\]|\x9d)[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"  # OSC (a title, a hyperlink), its end if present
    r"|(?:\x1b[PX^_]|[\x90\x98\x9e\x9f])[^\x1b\x9c]*(?:\x1b\\|\x9c)?"  # DCS, SOS, PM, APC strings
    r"|\x1b[ -/]*[0-~]"  # other escapes (ESC c resets the terminal)
)
# An escape sequence that is complete (its string forms ended), or that cannot become one.
_COMPLETE = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x1b\x9c\x07]*(?:\x07|\x1b\\|\x9c)"
    r"|\x1b[ -/]*[0-OQ-WYZ\\`a-~]"  # not the start of a CSI or a string form: those end as above
    r"|(?:\x1b\[|\x9b)[0-?]*[ -/]*[^\x20-\x7e]"  # a CSI broken by a byte no CSI holds
)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def terminal_safe(text: str) -> str:
    """`text` as it may be written to a terminal: escape sequences and control characters removed, newlines
    and tabs kept (a `\r\n` becomes `\n`)."""
    return _CONTROL.sub("", _ANSI.sub("", text))


class TerminalStream:
    """`terminal_safe` over a streamed answer, whose pieces may split an escape sequence: an unfinished one at
    the end of a piece waits for the next (at most `_HELD_MAX` characters; the end of the answer drops it)."""

    _HELD_MAX = 256

    def __init__(self) -> None:
        self._held = ""

    def feed(self, piece: str) -> str:
        text = self._held + piece
        start = max(text.rfind("\x1b"), text.rfind("\x9b"), text.rfind("\x9d"))
        if start >= 0 and len(text) - start <= self._HELD_MAX and not _COMPLETE.match(text, start):
            text, self._held = text[:start], text[start:]
        else:
            self._held = ""
        return terminal_safe(text)

    def flush(self) -> str:
        held, self._held = self._held, ""
        return terminal_safe(held)


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
