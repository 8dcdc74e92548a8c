"""Streaming validation of uploaded datasets, by content rather than file extension.

Accepts JSON Lines (one record per line) or one JSON array of records, UTF-8 with or without a
byte-order mark, LF or CRLF line ends. A file holds one kind of record (`DatasetSummary.kind`, set
by its first record): chat, each record one conversation in any shape `shared.chat_formats` accepts
(OpenAI chat, prompt/completion, query/response, Alpaca, ShareGPT), or preference pairs (OpenAI's DPO
records, `shared.preference`). A record of the other kind is a problem at its line. A valid upload is
rewritten normalised in the stored dataset format (`shared.stored_dataset`), which the worker reads.
Nothing is ever read whole into memory.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from shared.chat_formats import detect_shape, to_chat, unknown_shape_reason
from shared.preference import DataKind, kind_of, mixed_kinds_reason, to_preference
from shared.stored_dataset import write_record

MAX_PROBLEMS = 20
_CHUNK = 1 << 16
_BOM = codecs.BOM_UTF8


@dataclass(frozen=True)
class Problem:
    where: str  # "line 3" or "record 2 (line 7)"
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class DatasetError(Exception):
    problems: list[Problem]
    truncated: bool = False  # more problems existed than are listed

    def __str__(self) -> str:
        more = " (more problems not shown)" if self.truncated else ""
        return "invalid dataset: " + "; ".join(str(p) for p in self.problems) + more


@dataclass
class DatasetSummary:
    num_records: int
    num_messages: int = 0
    format: str = "jsonl"
    kind: DataKind = "chat"  # what every record is: chat conversations or preference pairs


def _size(n: int) -> str:
    return f"{n / 1048576:g} MiB" if n >= 1048576 else f"{n / 1024:g} KiB" if n >= 1024 else f"{n} bytes"


def reject_json_constant(name: str) -> Any:
    """`parse_constant` for json: NaN and Infinity are not JSON, whatever Python's parser allows."""
    raise ValueError(f"{name} is not valid JSON")


def _loads(text: str) -> Any:
    try:
        return json.loads(text, parse_constant=reject_json_constant)
    except RecursionError as exc:  # e.g. 100k nested arrays: a ValueError here, not a crash
        raise ValueError(_TOO_DEEP) from exc


_TOO_DEEP = "nested too deeply"


def check_record(obj: Any) -> tuple[list[dict[str, Any]] | None, str | None]:
    """The record's normalised messages (any accepted shape, `shared.chat_formats`), or why it is invalid."""
    record, reason = to_chat(obj)
    return (None, reason) if record is None else (record["messages"], None)


class _Collector:
    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.truncated = False

    def add(self, where: str, reason: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(Problem(where, reason))
        else:
            self.truncated = True

    @property
    def full(self) -> bool:
        return self.truncated


def _sniff(raw: IO[bytes]) -> tuple[str | None, bool]:
    """The first significant character ('[' or '{' ...) and whether a BOM was present."""
    head = raw.read(len(_BOM))
    bom = head == _BOM
    if not bom:
        raw.seek(0)
    while True:
        chunk = raw.read(_CHUNK)
        if not chunk:
            return None, bom
        stripped = chunk.lstrip(b" \t\r\n")
        if stripped:
            raw.seek(raw.tell() - len(chunk))
            return chr(stripped[0]), bom


def _jsonl(raw: IO[bytes], max_record: int, bad: _Collector) -> Iterator[tuple[int, Any]]:
    line_no = 0
    while not bad.full:
        line = raw.readline(max_record + 1)
        if not line:
            return
        line_no += 1
        if len(line) > max_record and not line.endswith(b"\n"):
            bad.add(
                f"line {line_no}",
                f"longer than the {_size(max_record)} per-record limit",
            )
            while line and not line.endswith(b"\n"):  # skip the rest of the over-long line
                line = raw.readline(_CHUNK)
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad.add(f"line {line_no}", f"invalid UTF-8 at byte {exc.start}")
            continue
        if not text.strip():
            continue
        try:
            yield line_no, _loads(text)
        except ValueError as exc:
            bad.add(f"line {line_no}", f"not valid JSON ({exc})")


class _ArrayReader:
    """Records of a top-level JSON array, decoded incrementally from a byte stream."""

    def __init__(self, raw: IO[bytes], max_record: int, bad: _Collector) -> None:
        self.raw, self.max_record, self.bad = raw, max_record, bad
        self.decoder = json.JSONDecoder(parse_constant=reject_json_constant)
        self.utf8 = codecs.getincrementaldecoder("utf-8")("strict")
        self.buf, self.pos, self.eof = "", 0, False
        self.base_line = 1  # line number of buf[0]

    def line_at(self, pos: int) -> int:
        return self.base_line + self.buf.count("\n", 0, pos)

    def fill(self) -> bool:
        """Append more text, dropping what was consumed; False at the end of input."""
        if self.eof:
            return False
        # Read as much as is pending (so re-decoding a long record stays linear overall), but never
        # past the record limit: an over-long record is refused with at most about that much held.
        pending = len(self.buf) - self.pos
        chunk = self.raw.read(max(_CHUNK, min(pending, self.max_record + 1 - pending)))
        try:
            text = self.utf8.decode(chunk, final=not chunk)
        except UnicodeDecodeError:
            self.bad.add(f"near line {self.line_at(len(self.buf))}", "invalid UTF-8")
            self.eof = True
            return False
        self.eof = not chunk
        self.base_line += self.buf.count("\n", 0, self.pos)
        self.buf, self.pos = self.buf[self.pos :] + text, 0
        return bool(chunk)

    def skip_ws(self) -> bool:
        """Move to the next significant character; False at the end of input."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf):
                return True
            if not self.fill():
                return False

    def records(self) -> Iterator[tuple[str, Any]]:
        self.skip_ws()
        self.pos += 1  # the opening '[' (sniffed already)
        if self.skip_ws() and self.buf[self.pos] == "]":
            self.pos += 1
            return self._after_close()
        index = 0
        while not self.bad.full:
            if not self.skip_ws():
                self.bad.add(f"after record {index}", "the JSON array is not closed with ']'")
                return
            index += 1
            where = f"record {index} (line {self.line_at(self.pos)})"
            obj = self._decode_one(where)
            if obj is _FAILED:
                return
            yield where, obj
            if not self.skip_ws():
                self.bad.add(f"after record {index}", "the JSON array is not closed with ']'")
                return
            sep = self.buf[self.pos]
            self.pos += 1
            if sep == "]":
                return self._after_close()
            if sep != ",":
                self.bad.add(f"after record {index}", f"expected ',' or ']', found {sep!r}")
                return

    def _decode_one(self, where: str) -> Any:
        while True:
            try:
                try:
                    obj, end = self.decoder.raw_decode(self.buf, self.pos)
                except RecursionError:
                    self.bad.add(where, f"not valid JSON ({_TOO_DEEP})")
                    return _FAILED
                if end - self.pos > self.max_record:
                    self.bad.add(where, f"longer than the {_size(self.max_record)} per-record limit")
                    return _FAILED
                self.pos = end
                return obj
            except ValueError as exc:
                if len(self.buf) - self.pos > self.max_record:
                    self.bad.add(
                        where,
                        f"longer than the {_size(self.max_record)} per-record limit",
                    )
                    return _FAILED
                if not self.fill():
                    self.bad.add(where, f"not valid JSON ({exc})")
                    return _FAILED

    def _after_close(self) -> None:
        if self.skip_ws():
            self.bad.add(f"line {self.line_at(self.pos)}", "unexpected data after the JSON array")


_FAILED = object()


def validate_dataset(src: Path, dest: Path, *, max_record_bytes: int, max_records: int) -> DatasetSummary:
    """Validate `src` and write its records to `dest` as normalised JSON Lines.

    Raises DatasetError (and leaves `dest` absent) when anything is wrong.
    """
    bad = _Collector()
    summary = DatasetSummary(num_records=0)
    try:
        with src.open("rb") as raw, dest.open("w", encoding="utf-8") as out:
            first, _ = _sniff(raw)
            records: Iterator[tuple[Any, Any]]
            if first is None:
                raise DatasetError([Problem("line 1", "the dataset is empty")])
            if first == "[":
                summary.format = "json-array"
                records = _ArrayReader(raw, max_record_bytes, bad).records()
            elif first == "{":
                records = _jsonl(raw, max_record_bytes, bad)
            else:
                raise DatasetError(
                    [
                        Problem(
                            "line 1",
                            "expected JSON Lines records ({...} per line) or a JSON array ([...])",
                        )
                    ]
                )
            first_where: str | None = None  # where the first record (which sets the file's kind) is
            mixed = False
            for where, obj in records:
                place = where if isinstance(where, str) else f"line {where}"
                kind = kind_of(obj)
                if first_where is None:
                    if kind == "chat" and detect_shape(obj) is None and not bad.problems:
                        # A file in no known shape gets one clear answer, not the same complaint per record.
                        raise DatasetError([Problem(place, unknown_shape_reason(obj))])
                    first_where, summary.kind = place, kind
                elif kind != summary.kind:
                    if not mixed:  # the first record of the other kind says it; the rest would repeat it
                        bad.add(place, mixed_kinds_reason(summary.kind, kind, first_where))
                        mixed = True
                    continue
                record, reason = to_chat(obj) if kind == "chat" else to_preference(obj)
                if record is None:
                    bad.add(place, str(reason))
                    continue
                summary.num_records += 1
                messages = record["messages"] if kind == "chat" else record["input"]["messages"]
                summary.num_messages += len(messages) + (2 if kind == "preference" else 0)  # and both outputs
                if summary.num_records > max_records:
                    bad.add(
                        f"record {summary.num_records}",
                        f"more than the {max_records} records allowed",
                    )
                    break
                if not bad.problems:
                    write_record(out, record)
        if not bad.problems and summary.num_records == 0:
            bad.add("line 1", "the dataset holds no records")
        if bad.problems:
            raise DatasetError(bad.problems, bad.truncated)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return summary
