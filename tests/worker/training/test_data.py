"""worker.training.data: assistant-only loss masks, template fallback, truncation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from tests.worker.helpers import loss_runs
from worker.training.data import (
    DatasetTokenizationError,
    tokenize_conversation,
    tokenize_dataset,
)
from worker.training.example import IGNORE_INDEX, Example

SYSTEM = "Be brief and polite."
TWO_TURNS = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "question1"},
    {"role": "assistant", "content": "answer1"},
    {"role": "user", "content": "question2"},
    {"role": "assistant", "content": "answer2"},
]
CHATML_HEADER = "<|im_start|>assistant\n"

# ChatML with a message count in front: rendering a prefix is not a prefix of the whole.
NOT_PREFIX_PRESERVING = (
    "{{ 'turns: ' + messages|length|string + '\\n' }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Not ChatML, but prefix preserving: the prefix method must work without response_template.
PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ 'Assistant:\\n' + message['content'] + '<|im_end|>\\n\\n' }}"
    "{% else %}{{ message['role'] + ':\\n' + message['content'] + '\\n\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:\\n' }}{% endif %}"
)


@pytest.fixture
def tokenizer(tiny_model_dir: Path) -> Any:
    """A fresh tokenizer per test, so tests may change its chat template."""
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def tokenize(tokenizer: Any, messages: list[dict[str, str]], **kwargs: Any) -> Example | None:
    kwargs.setdefault("max_length", None)
    kwargs.setdefault("response_template", None)
    return tokenize_conversation(tokenizer, messages, **kwargs)


def test_loss_is_exactly_each_answer_and_its_end_of_turn(tokenizer: Any) -> None:
    example = tokenize(tokenizer, TWO_TURNS)
    assert example is not None
    assert loss_runs(tokenizer, example) == ["answer1<|im_end|>", "answer2<|im_end|>"]


def test_input_ids_are_the_rendered_conversation_without_extra_special_tokens(
    tokenizer: Any,
) -> None:
    example = tokenize(tokenizer, TWO_TURNS)
    assert example is not None
    text = tokenizer.apply_chat_template(TWO_TURNS, tokenize=False)
    assert example.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(example.input_ids) == text
    assert len(example.labels) == len(example.input_ids)
    for token, label in zip(example.input_ids, example.labels, strict=True):
        assert label in (IGNORE_INDEX, token)


def test_system_user_and_headers_carry_no_loss(tokenizer: Any) -> None:
    example = tokenize(tokenizer, TWO_TURNS)
    assert example is not None
    trained = tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX])
    for text in (SYSTEM, "question1", "question2", "system", "user", "assistant", "<|im_start|>"):
        assert text not in trained
    assert "\n" not in trained  # neither the header's newline nor the one after <|im_end|>
    # the last token (newline after the final <|im_end|>) is not trained
    assert example.labels[-1] == IGNORE_INDEX


def test_unicode_and_multiline_answers_map_to_exact_tokens(tokenizer: Any) -> None:
    answer = "Café ☕ — naïve\nsecond line 🙂"
    messages = [{"role": "user", "content": "¿Qué?"}, {"role": "assistant", "content": answer}]
    example = tokenize(tokenizer, messages)
    assert example is not None
    assert loss_runs(tokenizer, example) == [answer + "<|im_end|>"]


def test_any_prefix_preserving_template_works_without_response_template(tokenizer: Any) -> None:
    tokenizer.chat_template = PLAIN_TEMPLATE
    example = tokenize(tokenizer, TWO_TURNS)
    assert example is not None
    assert loss_runs(tokenizer, example) == ["answer1<|im_end|>", "answer2<|im_end|>"]


def test_non_prefix_preserving_template_falls_back_to_response_template(tokenizer: Any) -> None:
    tokenizer.chat_template = NOT_PREFIX_PRESERVING
    example = tokenize(tokenizer, TWO_TURNS, response_template=CHATML_HEADER)
    assert example is not None
    assert loss_runs(tokenizer, example) == ["answer1<|im_end|>", "answer2<|im_end|>"]


def test_non_prefix_preserving_template_without_any_assistant_header_is_an_error(
    tokenizer: Any,
) -> None:
    tokenizer.chat_template = NOT_PREFIX_PRESERVING.replace("{% if add_generation_prompt %}", "{% if false %}")
    with pytest.raises(DatasetTokenizationError, match="set `response_template`"):
        tokenize(tokenizer, TWO_TURNS)


def test_without_response_template_the_header_comes_from_the_generation_prompt(tokenizer: Any) -> None:
    tokenizer.chat_template = NOT_PREFIX_PRESERVING
    derived = tokenize(tokenizer, TWO_TURNS)
    explicit = tokenize(tokenizer, TWO_TURNS, response_template=CHATML_HEADER)
    assert derived is not None and explicit is not None and derived.num_loss_tokens > 0
    assert derived.labels == explicit.labels


def test_response_template_that_never_occurs_is_an_error(tokenizer: Any) -> None:
    tokenizer.chat_template = NOT_PREFIX_PRESERVING
    with pytest.raises(DatasetTokenizationError, match="does not occur"):
        tokenize(tokenizer, TWO_TURNS, response_template="### Answer:")


def test_tokenizer_without_chat_template_is_an_error(tokenizer: Any) -> None:
    tokenizer.chat_template = None
    with pytest.raises(DatasetTokenizationError, match="no chat template"):
        tokenize(tokenizer, TWO_TURNS, response_template=CHATML_HEADER)


def test_truncation_keeps_the_first_max_length_tokens(tokenizer: Any) -> None:
    full = tokenize(tokenizer, TWO_TURNS)
    assert full is not None
    cut = len(full.input_ids) - 3
    truncated = tokenize(tokenizer, TWO_TURNS, max_length=cut)
    assert truncated is not None
    assert truncated.input_ids == full.input_ids[:cut]
    assert truncated.labels == full.labels[:cut]
    assert 0 < truncated.num_loss_tokens < full.num_loss_tokens


def test_max_length_longer_than_the_conversation_changes_nothing(tokenizer: Any) -> None:
    full = tokenize(tokenizer, TWO_TURNS)
    long = tokenize(tokenizer, TWO_TURNS, max_length=10_000)
    assert full == long


def test_example_whose_answers_are_truncated_away_is_none(tokenizer: Any) -> None:
    full = tokenize(tokenizer, TWO_TURNS)
    assert full is not None
    first_loss = next(i for i, t in enumerate(full.labels) if t != IGNORE_INDEX)
    assert tokenize(tokenizer, TWO_TURNS, max_length=first_loss) is None
    kept = tokenize(tokenizer, TWO_TURNS, max_length=first_loss + 1)
    assert kept is not None and kept.num_loss_tokens == 1


def test_tokenize_dataset_counts_skipped_examples(tokenizer: Any) -> None:
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    long = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    examples, skipped = tokenize_dataset(tokenizer, [short, long, short], max_length=64, response_template=None)
    assert skipped == 1
    assert len(examples) == 2
    assert all(loss_runs(tokenizer, e) == ["hello<|im_end|>"] for e in examples)


# ChatML with tools and tool calls, in the style of Qwen2.5's template.
TOOLS_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\\nTools:' }}{% for tool in tools %}{{ ' ' + tool['function']['name'] }}"
    "{% endfor %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] }}"
    "{% if message.tool_calls %}{% for call in message.tool_calls %}"
    "{{ '<tool_call>' + call['function']['name'] + ' ' + call['function']['arguments'] | tojson + '</tool_call>' }}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_weight_zero_turns_are_rendered_but_not_trained(tokenizer: Any) -> None:
    messages = [dict(m) for m in TWO_TURNS]
    messages[2]["weight"] = 0
    example = tokenize(tokenizer, messages)
    assert example is not None
    assert loss_runs(tokenizer, example) == ["answer2<|im_end|>"]
    assert "answer1" in tokenizer.decode(example.input_ids)


def test_tools_and_tool_calls_go_through_the_template(tokenizer: Any, tmp_path: Path) -> None:
    from shared.chat_formats import to_chat

    tokenizer.chat_template = TOOLS_TEMPLATE
    raw = {
        "messages": [
            {"role": "user", "content": "add"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "plus", "arguments": '{"a": 2}'}}]},
            {"role": "tool", "content": "4", "tool_call_id": "c1"},
            {"role": "assistant", "content": "four"},
        ],
        "tools": [{"type": "function", "function": {"name": "plus"}}],
    }  # fmt: skip
    record, reason = to_chat(raw)
    assert reason is None and record is not None
    (example,), skipped = tokenize_dataset(tokenizer, [record], max_length=None, response_template=None)
    text = tokenizer.decode(example.input_ids)
    assert skipped == 0 and text.startswith("<|im_start|>system\nTools: plus<|im_end|>")
    assert loss_runs(tokenizer, example) == ['<tool_call>plus {"a": 2}</tool_call><|im_end|>', "four<|im_end|>"]
