"""Packing lays sequences end to end; static packing rounds to a few bucket shapes."""

from __future__ import annotations

import pytest

from worker.training.example import IGNORE_INDEX, Example
from worker.training.packing import bucket_size, pack_examples, pack_static


def test_pack_examples_layout() -> None:
    a = Example([10, 11, 12], [IGNORE_INDEX, 11, 12])
    b = Example([20, 21], [20, 21])  # label at position 0 has no context: never a target
    packed = pack_examples([a, b], pad_to_multiple=4)
    assert packed.input_ids[:5] == [10, 11, 12, 20, 21] and len(packed.input_ids) == 8
    assert packed.position_ids == [0, 1, 2, 0, 1, 0, 1, 2]
    assert packed.seq_lens == (3, 2, 3) and packed.cu_seqlens == [0, 3, 5, 8]
    assert packed.loss_rows[:3] == [0, 1, 3] and packed.targets[:3] == [11, 12, 21]
    assert packed.targets[3] == IGNORE_INDEX and len(packed.targets) == 4
    assert (packed.num_tokens, packed.num_loss_tokens) == (5, 3)


@pytest.mark.parametrize(
    ("n", "bucket"), [(1, 256), (256, 256), (257, 320), (300, 320), (512, 512), (513, 640), (1500, 1536), (2049, 2560)]
)
def test_bucket_sizes_are_few_and_waste_at_most_a_quarter(n: int, bucket: int) -> None:
    assert bucket_size(n) == bucket
    assert n <= bucket and (bucket <= 256 or bucket <= 1.25 * n)


def test_distinct_buckets_stay_few_over_a_range_of_step_sizes() -> None:
    assert len({bucket_size(n) for n in range(1, 8193)}) == 1 + 4 * 5  # 256, then 4 per doubling up to 8192


def test_static_pack_has_fixed_shapes_for_a_bucket() -> None:
    short = [Example([1] * 40, [IGNORE_INDEX] * 10 + [1] * 30)]
    many = [Example([2] * 30, [2] * 30) for _ in range(4)]
    a, b = pack_static(short, max_sequences=4), pack_static(many, max_sequences=4)
    for packed in (a, b):
        assert len(packed.input_ids) == len(packed.position_ids) == len(packed.segment_ids) == 256
        assert len(packed.loss_rows) == len(packed.targets) == 256
        assert len(packed.cu_seqlens) == 4 + 2 and packed.cu_seqlens[-1] == 256
    assert a.cu_seqlens == [0, 40, 256, 256, 256, 256]  # one sequence, the filler, then empty segments
    assert b.cu_seqlens == [0, 30, 60, 90, 120, 256]
    assert (a.num_tokens, a.num_loss_tokens, b.num_tokens, b.num_loss_tokens) == (40, 30, 120, 116)
    assert a.targets[30:] == [IGNORE_INDEX] * 226


def test_static_pack_refuses_more_sequences_than_a_step_holds() -> None:
    with pytest.raises(ValueError, match="5 sequences in a step of at most 4"):
        pack_static([Example([1, 2], [1, 2])] * 5, max_sequences=4)
