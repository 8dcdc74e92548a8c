"""Reading a `text/event-stream` body: the events' types and data, comments and ids skipped."""

from __future__ import annotations

from collections.abc import Iterator


def sse_blocks(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    """(event type, data) for each event in a text/event-stream; comments and ids are skipped."""
    etype = "message"
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                yield etype, "\n".join(data)
            elif etype == "end":
                yield etype, ""
            etype, data = "message", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            etype = value
        elif field == "data":
            data.append(value)
