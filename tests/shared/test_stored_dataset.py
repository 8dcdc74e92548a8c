"""shared.stored_dataset: what the API writes is what the worker reads, one line at a time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.stored_dataset import read_preference_records, read_records, write_record

CHAT = {"messages": [{"role": "user", "content": "q é"}, {"role": "assistant", "content": "a ü"}]}
PAIR = {
    "input": {"messages": [{"role": "user", "content": "q"}]},
    "preferred_output": [{"role": "assistant", "content": "good"}],
    "non_preferred_output": [{"role": "assistant", "content": "bad"}],
}


def test_written_records_read_back_as_written(tmp_path: Path) -> None:
    chat, pairs = tmp_path / "chat.jsonl", tmp_path / "pairs.jsonl"
    with chat.open("w", encoding="utf-8") as out:
        write_record(out, CHAT)
    with pairs.open("w", encoding="utf-8") as out:
        write_record(out, PAIR)
    assert "é" in chat.read_text(encoding="utf-8")  # stored as text, not \u escapes
    assert list(read_records(chat)) == [CHAT]
    assert list(read_preference_records(pairs)) == [PAIR]


def test_read_records_yields_records_line_by_line(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    records = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "é"}, {"role": "assistant", "content": "ü"}]},
    ]
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    path.write_text(lines[0] + "\n\n" + lines[1] + "\n", encoding="utf-8")
    reader = read_records(path)
    assert next(reader) == records[0]
    assert list(reader) == [records[1]]


def test_read_records_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    good = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'
    path.write_text(good + '\n{"oops": 1}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=":2: no known record shape: keys 'oops'"):
        list(read_records(path))
