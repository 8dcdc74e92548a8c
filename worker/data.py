"""Chat records -> tokenized `Example`s whose labels cover only the assistant turns.

Loss spans are found in the rendered text, then mapped to tokens with the fast tokenizer's
offset mapping:

1. Prefix method (any prefix-preserving chat template): assistant message i spans from
   `len(render(messages[:i], add_generation_prompt=True))` to `len(render(messages[:i+1]))`
   with trailing whitespace stripped: its content and end-of-turn token (`<|im_end|>` in
   ChatML), not its header nor the newline after it.
2. Fallback, when the template does not preserve prefixes: each occurrence of
   `response_template` starts a span that runs to and including the next eos token string
   (or the end of the text).

Neither works -> `DatasetTokenizationError`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from worker.example import IGNORE_INDEX, Example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Messages = list[dict[str, str]]
Span = tuple[int, int]  # [start, end) character offsets in the rendered conversation


class DatasetTokenizationError(ValueError):
    """The dataset cannot be tokenized with this tokenizer (and response_template)."""


def read_records(path: Path) -> Iterator[Messages]:
    """Yield each record's `messages` from a JSON Lines file, one line at a time."""
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                messages = record["messages"]
            except (json.JSONDecodeError, TypeError, KeyError) as exc:
                raise ValueError(f"{path}:{lineno}: not a {{'messages': [...]}} record") from exc
            yield messages


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: Messages,
    *,
    max_length: int | None,
    response_template: str | None,
) -> Example | None:
    """Tokenize one conversation; labels are IGNORE_INDEX outside the assistant turns.

    Returns None when no loss token is left after truncation to `max_length`.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DatasetTokenizationError(
            "the tokenizer has no chat template; use a chat/instruct model or a tokenizer that defines `chat_template`"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise DatasetTokenizationError(
            "loss masking needs a fast (Rust `tokenizers`) tokenizer with offset mapping; "
            f"{type(tokenizer).__name__} is not one"
        )
    try:
        text = _render(tokenizer, messages)
    except DatasetTokenizationError:
        raise
    except Exception as exc:  # jinja errors, raise_exception() in templates
        raise DatasetTokenizationError(f"the chat template failed to render: {exc}") from exc

    spans = _prefix_spans(tokenizer, messages, text)
    if spans is None:
        if not response_template:
            raise DatasetTokenizationError(
                "the chat template does not preserve prefixes (rendering the first messages is "
                "not a prefix of rendering them all), so assistant turns cannot be located; "
                "set `response_template` to the text that starts each assistant turn"
            )
        spans = _response_template_spans(text, response_template, tokenizer.eos_token)
        if not spans:
            raise DatasetTokenizationError(
                f"response_template {response_template!r} does not occur in the conversation "
                f"as rendered by the chat template: {text[:200]!r}"
            )

    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids: list[int] = list(encoding["input_ids"])
    offsets: list[tuple[int, int]] = list(encoding["offset_mapping"])
    labels = _labels_from_spans(input_ids, offsets, spans)
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    example = Example(input_ids=input_ids, labels=labels)
    return example if example.num_loss_tokens else None


def tokenize_dataset(
    tokenizer: PreTrainedTokenizerBase,
    records: Iterable[Messages],
    *,
    max_length: int | None,
    response_template: str | None,
) -> tuple[list[Example], int]:
    """Tokenize every record; return the examples and how many were skipped (no loss left)."""
    examples: list[Example] = []
    skipped = 0
    for messages in records:
        example = tokenize_conversation(tokenizer, messages, max_length=max_length, response_template=response_template)
        if example is None:
            skipped += 1
        else:
            examples.append(example)
    return examples, skipped


def _render(tokenizer: PreTrainedTokenizerBase, messages: Messages, *, add_generation_prompt: bool = False) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    if not isinstance(text, str):  # tokenize=False always gives a str; keep mypy honest
        raise DatasetTokenizationError(f"chat template rendered {type(text).__name__}, not str")
    return text


def _prefix_spans(tokenizer: PreTrainedTokenizerBase, messages: Messages, text: str) -> list[Span] | None:
    """Assistant spans by rendering prefixes; None when the template is not prefix preserving."""
    spans: list[Span] = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        if i == 0:  # no prefix to render: the header cannot be told from the content
            return None
        try:
            before = _render(tokenizer, messages[:i], add_generation_prompt=True)
            through = _render(tokenizer, messages[: i + 1])
        except Exception:  # a template may refuse a partial conversation
            return None
        if not (text.startswith(through) and through.startswith(before)):
            return None
        start, end = len(before), len(through.rstrip())
        if end <= start:
            return None
        spans.append((start, end))
    return spans


def _response_template_spans(text: str, response_template: str, eos: str | None) -> list[Span]:
    """Each response_template occurrence starts a span through the next eos (or end of text)."""
    spans: list[Span] = []
    pos = text.find(response_template)
    while pos != -1:
        start = pos + len(response_template)
        end = len(text)
        if eos:
            eos_pos = text.find(eos, start)
            if eos_pos != -1:
                end = eos_pos + len(eos)
        if end > start:
            spans.append((start, end))
        pos = text.find(response_template, end)
    return spans


def _labels_from_spans(input_ids: list[int], offsets: list[tuple[int, int]], spans: list[Span]) -> list[int]:
    """Label a token with its id when its characters overlap a span, else IGNORE_INDEX."""
    labels = [IGNORE_INDEX] * len(input_ids)
    span_idx = 0
    for k, (token_start, token_end) in enumerate(offsets):
        while span_idx < len(spans) and token_start >= spans[span_idx][1]:
            span_idx += 1
        if span_idx == len(spans):
            break
        if token_end > spans[span_idx][0] and token_end > token_start:
            labels[k] = input_ids[k]
    return labels
