"""The unit the training loop consumes: one tokenized conversation with its loss mask."""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100  # label value that carries no loss (PyTorch cross-entropy's ignore_index)


@dataclass(frozen=True, slots=True)
class Example:
    """One conversation after tokenization.

    `labels[i]` is `input_ids[i]` where the token is trained on (assistant content and its
    end-of-turn token), else IGNORE_INDEX. Labels are *not* shifted: position i predicts
    `labels[i]` from tokens before it, exactly like Hugging Face `labels`.
    """

    input_ids: list[int]
    labels: list[int]

    @property
    def num_loss_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)
