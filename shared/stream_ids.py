"""The one stream-id rule: which event cursors a client may send (`?after=`, `Last-Event-ID`, `ftevent-…`).

A Redis stream id is `<ms>-<seq>`, each part an unsigned 64-bit number. Anything else sent to Redis
comes back as an error (a 500, or a reset SSE connection), so every cursor a client sends is parsed
here first and only the canonical form reaches Redis.
"""

from __future__ import annotations

MAX_PART = 2**64 - 1
FIRST = "0-0"  # no event is older: nothing comes before it
LAST = f"{MAX_PART}-{MAX_PART}"  # no event is newer: nothing comes after it

_SHAPE = "expected <milliseconds>-<sequence>, two whole numbers such as 1718000000000-0"


class StreamIdError(ValueError):
    """Text that is not a stream id; the message says why."""


def parse_stream_id(text: str) -> str:
    """The canonical `<ms>-<seq>` of `text`, or StreamIdError.

    Each part is ASCII digits from 0 to 2^64-1 (leading zeros allowed); a bare `<ms>` stands for `<ms>-0`.
    """
    ms, dash, seq = text.partition("-")
    named = [("milliseconds", ms)] + ([("sequence", seq)] if dash else [])
    values: list[int] = []
    for name, part in named:
        if not (part.isascii() and part.isdigit()):
            raise StreamIdError(f"{_shown(text)} is not a stream id: {_SHAPE}")
        digits = part.lstrip("0") or "0"
        if len(digits) > len(str(MAX_PART)) or int(digits) > MAX_PART:
            raise StreamIdError(f"{_shown(text)} is out of range: its {name} part exceeds {MAX_PART} (2^64-1)")
        values.append(int(digits))
    ms_value, seq_value = values[0], values[1] if dash else 0
    return f"{ms_value}-{seq_value}"


def _shown(text: str) -> str:
    return repr(text if len(text) <= 64 else text[:61] + "...")
