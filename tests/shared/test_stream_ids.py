"""The one stream-id rule: canonical ids out, a precise reason for anything Redis would refuse."""

from __future__ import annotations

import pytest

from shared.stream_ids import LAST, StreamIdError, parse_stream_id


@pytest.mark.parametrize(
    ("text", "canonical"),
    [("0-0", "0-0"), ("5", "5-0"), ("007-01", "7-1"), (LAST, LAST), ("0" * 30 + "1-0", "1-0")],
)
def test_the_parser_gives_the_canonical_id(text: str, canonical: str) -> None:
    assert parse_stream_id(text) == canonical


@pytest.mark.parametrize("text", ["", "abc", "-1-0", "1-", "-", "1-2-3", "1.5-0", "+1-0", " 1-0", "١-0"])
def test_anything_but_ascii_digits_is_not_a_stream_id(text: str) -> None:
    with pytest.raises(StreamIdError, match="is not a stream id"):
        parse_stream_id(text)


def test_the_parser_names_the_part_out_of_range() -> None:
    with pytest.raises(StreamIdError, match="its sequence part exceeds 18446744073709551615"):
        parse_stream_id("1-18446744073709551616")
    with pytest.raises(StreamIdError, match="its milliseconds part exceeds"):
        parse_stream_id("9" * 5000 + "-0")
