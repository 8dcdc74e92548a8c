import json
from pathlib import Path

import pytest

from api.dataset_validation import MAX_PROBLEMS, DatasetError, validate_dataset
from tests.data import easy_records, jsonl


def _run(tmp_path: Path, data: bytes, max_record: int = 1 << 20) -> tuple[Path, int]:
    src, dest = tmp_path / "in", tmp_path / "out.jsonl"
    src.write_bytes(data)
    summary = validate_dataset(src, dest, max_record_bytes=max_record, max_records=1000)
    return dest, summary.num_records


def _problems(tmp_path: Path, data: bytes, max_record: int = 1 << 20) -> list[str]:
    with pytest.raises(DatasetError) as info:
        _run(tmp_path, data, max_record)
    assert not (tmp_path / "out.jsonl").exists(), "a rejected dataset must leave no output"
    return [str(p) for p in info.value.problems]


def test_jsonl_is_normalised(tmp_path: Path) -> None:
    dest, n = _run(tmp_path, jsonl(easy_records(3)))
    assert n == 3
    lines = dest.read_text().splitlines()
    assert [json.loads(line) for line in lines] == easy_records(3)


def test_json_array_bom_and_crlf_are_accepted(tmp_path: Path) -> None:
    array = json.dumps(easy_records(4), indent=2).replace("\n", "\r\n").encode()
    dest, n = _run(tmp_path, b"\xef\xbb\xbf" + array)
    assert n == 4 and [json.loads(x) for x in dest.read_text().splitlines()] == easy_records(4)
    _, n = _run(tmp_path, jsonl(easy_records(2)).replace(b"\n", b"\r\n"))
    assert n == 2


def test_system_message_first_is_allowed(tmp_path: Path) -> None:
    rec = {"messages": [{"role": "system", "content": "Be brief."}, *easy_records(1)[0]["messages"]]}
    _, n = _run(tmp_path, jsonl([rec]))
    assert n == 1


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "line 1: the dataset is empty"),
        (b"[]", "line 1: the dataset holds no records"),
        (b"hello", "line 1: expected JSON Lines"),
        (b'{"messages": [{"role": "user", "content": "hi"}]}\n', "line 1: the conversation must end with an assistant"),
        (b'{"messages": []}\n', "line 1: 'messages' must be a non-empty list"),
        (b'{"text": "x"}\n', "line 1: no known record shape: keys 'text'; accepted shapes: chat"),
        (b'{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]}',
         "line 1: messages[0].content is empty"),
        (b'{"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "a"}]}',
         "line 1: messages[0].role 'bot' is not one of"),
        (b'{"messages": [{"role": "assistant", "content": "x"}]}', "expected 'user'"),
        (b'{"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "a"}]}',
         "a system message may only come first"),
        (b'{"messages": [{"role": "user", "content": NaN}]}', "line 1: not valid JSON (NaN is not valid JSON)"),
        (b'{"messages": [{"role": "user", "content": 5}]}', "messages[0].content must be a string"),
        (b'[{"messages": Infinity}]', "record 1 (line 1): not valid JSON"),
        (b'[{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}',
         "the JSON array is not closed"),
    ],
)  # fmt: skip
def test_bad_datasets_name_line_and_reason(tmp_path: Path, data: bytes, expected: str) -> None:
    problems = _problems(tmp_path, data)
    assert any(expected in p for p in problems), problems


def test_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    data = jsonl(easy_records(2)) + b'{"messages": "\xff\xfe"}\n'
    assert _problems(tmp_path, data) == ["line 3: invalid UTF-8 at byte 14"]


def test_problem_list_is_capped_and_keeps_line_numbers(tmp_path: Path) -> None:
    data = b'{"messages": [{"role": "user", "content": "hi"}]}\n' * 50
    problems = _problems(tmp_path, data)
    assert len(problems) == MAX_PROBLEMS
    assert problems[0].startswith("line 1:") and problems[-1].startswith(f"line {MAX_PROBLEMS}:")


def test_a_file_in_no_known_shape_gets_one_answer(tmp_path: Path) -> None:
    problems = _problems(tmp_path, b'{"text": "a", "label": 1}\n' * 50)
    assert len(problems) == 1
    assert problems[0].startswith("line 1: no known record shape: keys 'text', 'label'; accepted shapes: chat")
    assert "Alpaca" in problems[0] and "ShareGPT" in problems[0] and "query/response" in problems[0]


def test_over_long_record_is_refused_without_reading_it_whole(tmp_path: Path) -> None:
    big = b'{"messages": [{"role": "user", "content": "' + b"a" * 5000 + b'"}]}\n'
    assert _problems(tmp_path, big, max_record=1024) == ["line 1: longer than the 1 KiB per-record limit"]
    arr = b"[" + big.strip() + b"]"
    assert _problems(tmp_path, arr, max_record=1024) == ["record 1 (line 1): longer than the 1 KiB per-record limit"]
