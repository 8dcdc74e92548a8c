"""Packing a step's sequences into one row, optionally into a fixed set of static shapes.

Eager steps pack exactly (no padding). Static steps (compiled and CUDA-graph captured) round the
row length and the number of loss rows up to a few bucket sizes and give ``cu_seqlens`` a fixed
length (`max_sequences` + 2 entries, trailing zero-length segments), so every step of a bucket has
the same shapes and the same host-side values, and a captured graph can be replayed for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from worker.training.example import IGNORE_INDEX, Example

PAD_ID = 0  # filler token id (its own segment, never in the loss)
MIN_BUCKET = 256  # smallest static row / loss-row count
BUCKETS_PER_OCTAVE = 4  # 256, 320, 384, 448, 512, 640, ...: at most 25 % filler, ~12 % on average


@dataclass(frozen=True, slots=True)
class PackedBatch:
    """A step's sequences laid end to end in one row, with everything the fast step needs."""

    input_ids: list[int]
    position_ids: list[int]
    segment_ids: list[int]  # which sequence each position belongs to
    cu_seqlens: list[int]  # sequence boundaries, 0 first; trailing repeats are zero-length segments
    seq_lens: tuple[int, ...]  # including a trailing filler segment when padded
    loss_rows: list[int]  # row of the packed hidden states predicting each target
    targets: list[int]  # IGNORE_INDEX only for filler rows
    num_tokens: int  # real tokens
    num_loss_tokens: int  # real targets

    @property
    def max_len(self) -> int:
        return max(self.seq_lens)


def pack_examples(examples: Sequence[Example], *, pad_to_multiple: int | None = None) -> PackedBatch:
    """Pack `examples` into one row. Position i of a sequence predicts its label i+1.

    With `pad_to_multiple`, the row and the loss rows are padded up to a multiple of it (a filler
    segment that attends only to itself, and ignored loss rows).
    """
    tokens = rows = None
    if pad_to_multiple:
        n_tokens = sum(len(e.input_ids) for e in examples)
        n_rows = sum(count_loss_tokens(e) for e in examples)
        tokens, rows = _round_up(n_tokens, pad_to_multiple), _round_up(n_rows, pad_to_multiple)
    return _pack(examples, tokens=tokens, rows=rows, segments=None)


def pack_static(examples: Sequence[Example], *, max_sequences: int) -> PackedBatch:
    """Pack into bucketed shapes: row and loss rows rounded up to `bucket_size`, fixed-length cu_seqlens."""
    if len(examples) > max_sequences:
        raise ValueError(f"{len(examples)} sequences in a step of at most {max_sequences}")
    n_tokens = sum(len(e.input_ids) for e in examples)
    n_rows = sum(count_loss_tokens(e) for e in examples)
    return _pack(examples, tokens=bucket_size(n_tokens), rows=bucket_size(n_rows), segments=max_sequences + 1)


def bucket_size(n: int) -> int:
    """The smallest bucket >= n: MIN_BUCKET, then BUCKETS_PER_OCTAVE geometric steps per doubling."""
    if n <= MIN_BUCKET:
        return MIN_BUCKET
    octave = 1 << ((n - 1).bit_length() - 1)  # largest power of two below n
    step = octave // BUCKETS_PER_OCTAVE
    return _round_up(n, step)


def count_loss_tokens(example: Example) -> int:
    """Labels that are predicted (the first position has no context, so it never is)."""
    return sum(1 for label in example.labels[1:] if label != IGNORE_INDEX)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pack(examples: Sequence[Example], *, tokens: int | None, rows: int | None, segments: int | None) -> PackedBatch:
    input_ids: list[int] = []
    position_ids: list[int] = []
    segment_ids: list[int] = []
    loss_rows: list[int] = []
    targets: list[int] = []
    seq_lens: list[int] = []
    for segment, example in enumerate(examples):
        offset, length = len(input_ids), len(example.input_ids)
        input_ids.extend(example.input_ids)
        position_ids.extend(range(length))
        segment_ids.extend([segment] * length)
        seq_lens.append(length)
        for i, label in enumerate(example.labels[1:]):
            if label != IGNORE_INDEX:
                loss_rows.append(offset + i)
                targets.append(label)
    num_tokens, num_loss_tokens = len(input_ids), len(targets)
    filler = (tokens or num_tokens) - num_tokens
    if filler:
        input_ids.extend([PAD_ID] * filler)
        position_ids.extend(range(filler))
        segment_ids.extend([len(seq_lens)] * filler)
        seq_lens.append(filler)
    extra = (rows or num_loss_tokens) - num_loss_tokens
    loss_rows.extend([0] * extra)
    targets.extend([IGNORE_INDEX] * extra)
    cu_seqlens = [0]
    for length in seq_lens:
        cu_seqlens.append(cu_seqlens[-1] + length)
    if segments is not None:  # fixed count: zero-length segments at the end
        cu_seqlens.extend([cu_seqlens[-1]] * (segments + 1 - len(cu_seqlens)))
    return PackedBatch(
        input_ids, position_ids, segment_ids, cu_seqlens, tuple(seq_lens), loss_rows, targets, num_tokens,
        num_loss_tokens,
    )  # fmt: skip
