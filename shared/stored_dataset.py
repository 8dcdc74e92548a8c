"""The stored dataset format: the normalised JSON Lines file the API writes once an upload is valid, and
the worker reads to train.

One record per line, UTF-8: a chat record (``{"messages": [...], "tools": [...]}``, `shared.chat_formats`)
or a preference pair (`shared.preference`), every record of a file the same kind. The readers also take
records in any other shape those modules accept, because a dataset given to the training library by path
need not have come through the API. Files are read one line at a time, never whole.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, TypeVar

from shared.chat_formats import ChatRecord, to_chat
from shared.preference import PreferenceRecord, to_preference

R = TypeVar("R")


def write_record(out: IO[str], record: Mapping[str, Any]) -> None:
    """Append one normalised record to a stored dataset open for writing."""
    # Not ASCII-escaped: the file stays as readable (and as small) as the upload it came from.
    out.write(json.dumps(record, ensure_ascii=False))
    out.write("\n")


def read_records(path: Path) -> Iterator[ChatRecord]:
    """Yield each record of a JSON Lines file as chat (messages, and tools where given), one line at a
    time; records may be in any shape `shared.chat_formats` accepts."""
    return _read_jsonl(path, to_chat)


def read_preference_records(path: Path) -> Iterator[PreferenceRecord]:
    """Each preference record of a JSON Lines file, one line at a time."""
    return _read_jsonl(path, to_preference)


def _read_jsonl(path: Path, convert: Callable[[Any], tuple[R | None, str | None]]) -> Iterator[R]:
    """Each record of a JSON Lines file through `convert` (the record, or why it is invalid), one line at
    a time; ValueError naming the file and line of the first bad one."""
    with Path(path).open(encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc})") from exc
            record, reason = convert(raw)
            if record is None:
                raise ValueError(f"{path}:{lineno}: {reason}")
            yield record
