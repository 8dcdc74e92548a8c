"""Chat records -> tokenized `Example`s whose labels cover only the assistant turns.

Loss spans are found in the rendered text, then mapped to tokens with the fast tokenizer's
offset mapping. Each span runs from the end of an assistant header through that turn's own
end-of-turn marker, which is trained so the model learns to stop. The span never ends at
`eos_token`: base tokenizers often close turns with another token (Qwen2.5/Qwen3 base: eos
`<|endoftext|>`, turns end with `<|im_end|>`; Llama-3 base: `<|end_of_text|>` vs `<|eot_id|>`;
Phi-3: `<|end|>`), and ending there would train user turns and trailing tokens.

The end-of-turn marker is read off the chat template's own renders (`find_turn_end`): a probe
conversation whose assistant content is a sentinel is rendered followed by a user turn, as the
last message, and with a generation prompt; the tokens that follow the sentinel in all of these,
stripped of whitespace, are the marker (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `<|end|>`,
or `</s>` where the template closes turns with eos). A template that renders only whitespace
there has no turn end to learn, and one the probe cannot render is not guessed at: both are a
`DatasetTokenizationError`.

1. Prefix method (any prefix-preserving chat template): assistant message i starts at
   `len(render(messages[:i], add_generation_prompt=True))` and ends after the marker that closes
   `render(messages[:i+1])` (which ends as the probe's last message did, e.g. "<|im_end|>\\n" or
   Phi-3's "<|end|>\\n<|endoftext|>"); that render up to there must be a prefix of the whole one.
   So the span is the content and its marker, not the header nor anything after the marker.
2. Fallback, when the template does not preserve prefixes (Qwen3 drops earlier turns' `<think>`
   blocks): each occurrence of `response_template` starts a span that runs through the next
   end-of-turn marker; there must be exactly one occurrence per assistant message.

Neither works -> `DatasetTokenizationError`.

Records may carry a top-level ``tools`` list (rendered through the template's ``tools``) and
assistant messages a ``weight``: 0 keeps that turn out of the loss (OpenAI's per-message weight).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from worker.training.chat_template import (
    DatasetTokenizationError,
    Messages,
    TurnEnd,
    check_tokenizer,
    derive_response_template,
    find_turn_end,
    render,
)
from worker.training.example import IGNORE_INDEX, Example

__all__ = [
    "DatasetTokenizationError",
    "TurnEnd",
    "derive_response_template",
    "find_turn_end",
    "tokenize_conversation",
    "tokenize_dataset",
]

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ChatRecord = dict[str, Any]  # {"messages": Messages, "tools": [...]?}, as shared.chat_formats writes it
Span = tuple[int, int]  # [start, end) character offsets in the rendered conversation


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: Messages,
    *,
    max_length: int | None,
    response_template: str | None,
    turn_end: TurnEnd | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> Example | None:
    """Tokenize one conversation; labels are IGNORE_INDEX outside the assistant turns.

    `turn_end`: the template's `find_turn_end(tokenizer)`, derived here when not given (pass it
    to tokenize many conversations without probing the template each time).
    Returns None when no loss token is left after truncation to `max_length`.
    """
    check_tokenizer(tokenizer)
    trained = [m.get("weight", 1) != 0 for m in messages if m.get("role") == "assistant"]
    messages = [{k: v for k, v in m.items() if k != "weight"} for m in messages]  # not the template's business
    try:
        text = render(tokenizer, messages, tools=tools)
    except DatasetTokenizationError:
        raise
    except Exception as exc:  # jinja errors, raise_exception() in templates
        raise DatasetTokenizationError(f"the chat template failed to render: {exc}") from exc
    if turn_end is None:
        turn_end = find_turn_end(tokenizer)

    spans = _prefix_spans(tokenizer, messages, text, turn_end, tools)
    if spans is None:
        response_template = response_template or derive_response_template(tokenizer)
        if not response_template:
            raise DatasetTokenizationError(
                "the chat template does not preserve prefixes (rendering the first messages is "
                "not a prefix of rendering them all), so assistant turns cannot be located, and its "
                "generation prompt gives no assistant header; set `response_template` to the text "
                "that starts each assistant turn"
            )
        spans = _response_template_spans(text, response_template, turn_end.marker)
        if not spans:
            raise DatasetTokenizationError(
                f"response_template {response_template!r} does not occur in the conversation "
                f"as rendered by the chat template: {text[:200]!r}"
            )
        n_assistant = sum(1 for message in messages if message.get("role") == "assistant")
        if len(spans) != n_assistant:
            raise DatasetTokenizationError(
                f"response_template {response_template!r} starts {len(spans)} turns in the conversation as rendered "
                f"by the chat template, but it has {n_assistant} assistant messages; set it to the exact text that "
                f"starts each assistant turn and occurs nowhere else: {text[:200]!r}"
            )

    spans = [span for span, keep in zip(spans, trained, strict=True) if keep]  # one span per assistant message
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
    records: Iterable[ChatRecord | Messages],
    *,
    max_length: int | None,
    response_template: str | None,
) -> tuple[list[Example], int]:
    """Tokenize every record; return the examples and how many were skipped (no loss left)."""
    examples: list[Example] = []
    skipped = 0
    turn_end: TurnEnd | None = None
    for record in records:
        if turn_end is None:  # probed once, when the first record arrives
            turn_end = find_turn_end(tokenizer)
        messages, tools = (record, None) if isinstance(record, list) else (record["messages"], record.get("tools"))
        example = tokenize_conversation(
            tokenizer, messages, max_length=max_length, response_template=response_template, turn_end=turn_end,
            tools=tools,
        )  # fmt: skip
        if example is None:
            skipped += 1
        else:
            examples.append(example)
    return examples, skipped


def _prefix_spans(
    tokenizer: PreTrainedTokenizerBase,
    messages: Messages,
    text: str,
    turn_end: TurnEnd,
    tools: list[dict[str, Any]] | None = None,
) -> list[Span] | None:
    """Assistant spans by rendering prefixes; None when the template is not prefix preserving."""
    tail = turn_end.final_tail
    spans: list[Span] = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        if i == 0:  # no prefix to render: the header cannot be told from the content
            return None
        try:
            before = render(tokenizer, messages[:i], add_generation_prompt=True, tools=tools)
            through = render(tokenizer, messages[: i + 1], tools=tools)
        except Exception:  # a template may refuse a partial conversation
            return None
        if not through.endswith(tail):  # this turn does not close as the probe's did
            return None
        start = len(before)
        end = len(through) - len(tail) + turn_end.marker_end_in_final_tail
        if end - len(turn_end.marker) < start:
            return None
        if not (through.startswith(before) and text.startswith(through[:end])):
            return None
        spans.append((start, end))
    return spans


def _response_template_spans(text: str, response_template: str, marker: str) -> list[Span]:
    """Each response_template occurrence starts a span through the next end-of-turn marker."""
    spans: list[Span] = []
    pos = text.find(response_template)
    while pos != -1:
        start = pos + len(response_template)
        marker_pos = text.find(marker, start)
        if marker_pos == -1:
            raise DatasetTokenizationError(
                f"the assistant turn that response_template {response_template!r} starts at character {pos} "
                f"is not closed by the chat template's end-of-turn marker {marker!r}: {text[pos : pos + 200]!r}"
            )
        end = marker_pos + len(marker)
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
