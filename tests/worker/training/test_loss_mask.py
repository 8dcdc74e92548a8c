"""worker.training.data loss masks: each assistant span ends at its template's own end-of-turn marker.

Tokenizers are built here, offline, with chat templates written in the style of real model
families whose base tokenizers' eos is not what closes a turn. Every test compares the exact
trained text, decoded from the labelled tokens, with what the template renders for the answers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import pytest
from transformers import PreTrainedTokenizerFast

from tests.fixtures.tiny_model import train_byte_level_bpe
from tests.worker.helpers import loss_runs
from worker.training.data import (
    DatasetTokenizationError,
    TurnEnd,
    derive_response_template,
    find_turn_end,
    tokenize_conversation,
    tokenize_dataset,
)
from worker.training.example import IGNORE_INDEX, Example

SYSTEM = "Be brief."
QUESTION_1 = "Hi, who are you?"
ANSWER_1 = "Hello there"
QUESTION_2 = "What is two plus two?"
ANSWER_2 = "It is four."

CORPUS = [SYSTEM, QUESTION_1, ANSWER_1, QUESTION_2, ANSWER_2, "user assistant model system"] * 3

# Qwen2.5 ChatML, default system message included.
CHATML = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Qwen3: reasoning is split off each answer; only answers after the last user turn keep a
# <think> block (an empty one for the last answer), so earlier turns render differently once a
# later user turn exists: the template does not preserve prefixes.
QWEN3 = (
    "{%- set ns = namespace(last_query_index=-1) %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{%- set ns.last_query_index = loop.index0 %}{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- set content = message['content'] %}{%- set reasoning_content = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n'"
    " + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3 = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
# Phi-3 closes a conversation without a generation prompt with eos, after the last turn's <|end|>.
PHI3 = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)
# Mistral closes each answer with eos itself and has no generation prompt.
MISTRAL = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
    "{% endfor %}"
)


@dataclass(frozen=True)
class Family:
    name: str
    template: str
    eos: str
    special: tuple[str, ...]  # besides bos/eos
    marker: str  # the end-of-turn marker the template closes answers with
    response_template: str  # what starts each assistant turn
    single: list[str]  # exact trained text of a one-answer conversation
    multi: list[str]  # ... and of a two-answer one
    trailing: str  # what the template renders after the last answer's marker (never trained)
    bos: str | None = None
    added: tuple[str, ...] = ()  # ordinary (non-special) added tokens
    system: bool = True  # whether the template accepts a system message
    preserves_prefixes: bool = True  # for the two-answer conversation


FAMILIES = [
    Family(
        name="chatml-qwen2.5-base",
        template=CHATML,
        eos="<|endoftext|>",
        special=("<|im_start|>", "<|im_end|>"),
        marker="<|im_end|>",
        response_template="<|im_start|>assistant\n",
        single=[f"{ANSWER_1}<|im_end|>"],
        multi=[f"{ANSWER_1}<|im_end|>", f"{ANSWER_2}<|im_end|>"],
        trailing="\n",
    ),
    Family(
        name="qwen3-base",
        template=QWEN3,
        eos="<|endoftext|>",
        special=("<|im_start|>", "<|im_end|>"),
        added=("<think>", "</think>"),
        marker="<|im_end|>",
        response_template="<|im_start|>assistant\n",
        single=[f"<think>\n\n</think>\n\n{ANSWER_1}<|im_end|>"],
        multi=[f"{ANSWER_1}<|im_end|>", f"<think>\n\n</think>\n\n{ANSWER_2}<|im_end|>"],
        trailing="\n",
        preserves_prefixes=False,
    ),
    Family(
        name="llama3-base",
        template=LLAMA3,
        bos="<|begin_of_text|>",
        eos="<|end_of_text|>",
        special=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        marker="<|eot_id|>",
        response_template="<|start_header_id|>assistant<|end_header_id|>\n\n",
        single=[f"{ANSWER_1}<|eot_id|>"],
        multi=[f"{ANSWER_1}<|eot_id|>", f"{ANSWER_2}<|eot_id|>"],
        trailing="",
    ),
    Family(
        name="gemma",
        template=GEMMA,
        bos="<bos>",
        eos="<eos>",
        special=("<start_of_turn>", "<end_of_turn>"),
        marker="<end_of_turn>",
        response_template="<start_of_turn>model\n",
        single=[f"{ANSWER_1}<end_of_turn>"],
        multi=[f"{ANSWER_1}<end_of_turn>", f"{ANSWER_2}<end_of_turn>"],
        trailing="\n",
        system=False,
    ),
    Family(
        name="phi3",
        template=PHI3,
        eos="<|endoftext|>",
        special=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        marker="<|end|>",
        response_template="<|assistant|>\n",
        single=[f"{ANSWER_1}<|end|>"],
        multi=[f"{ANSWER_1}<|end|>", f"{ANSWER_2}<|end|>"],
        trailing="\n<|endoftext|>",
    ),
    Family(
        name="mistral",
        template=MISTRAL,
        bos="<s>",
        eos="</s>",
        special=("[INST]", "[/INST]"),
        marker="</s>",
        response_template="[/INST]",
        single=[f" {ANSWER_1}</s>"],
        multi=[f" {ANSWER_1}</s>", f" {ANSWER_2}</s>"],
        trailing="",
        system=False,
    ),
]
BY_NAME = {family.name: family for family in FAMILIES}
# The same templates behind a message count: rendering a prefix is then never a prefix of the
# whole, so only the response_template fallback can locate the answers.
COUNT_HEADER = "{{ 'turns: ' + messages|length|string + '\\n' }}"


@functools.cache
def _trained_tokenizer_json(specials: tuple[str, ...]) -> str:
    """A byte-level BPE over a tiny corpus with these special tokens (tens of ms), serialized."""
    return train_byte_level_bpe(CORPUS, vocab_size=320, special_tokens=specials).to_str()


def build_tokenizer(family: Family, *, template: str | None = None) -> Any:
    """A fresh fast tokenizer for `family` (its chat template unless `template` is given)."""
    from tokenizers import Tokenizer

    specials = tuple(t for t in (family.bos, family.eos, *family.special) if t is not None)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json(specials)),
        bos_token=family.bos,
        eos_token=family.eos,
        additional_special_tokens=list(family.special),
        chat_template=template if template is not None else family.template,
        clean_up_tokenization_spaces=False,
    )
    if family.added:
        tokenizer.add_tokens(list(family.added))
    return tokenizer


def single_turn() -> list[dict[str, str]]:
    return [{"role": "user", "content": QUESTION_1}, {"role": "assistant", "content": ANSWER_1}]


def multi_turn(family: Family) -> list[dict[str, str]]:
    head = [{"role": "system", "content": SYSTEM}] if family.system else []
    return [
        *head,
        {"role": "user", "content": QUESTION_1},
        {"role": "assistant", "content": ANSWER_1},
        {"role": "user", "content": QUESTION_2},
        {"role": "assistant", "content": ANSWER_2},
    ]


def tokenize(tokenizer: Any, messages: list[dict[str, str]], response_template: str | None) -> Example:
    example = tokenize_conversation(tokenizer, messages, max_length=None, response_template=response_template)
    assert example is not None
    return example


CASES = [pytest.param(f, "single", id=f"{f.name}-single") for f in FAMILIES] + [
    pytest.param(f, "multi", id=f"{f.name}-multi") for f in FAMILIES
]


def conversation_and_expected(family: Family, turns: str) -> tuple[list[dict[str, str]], list[str]]:
    if turns == "single":
        return single_turn(), family.single
    return multi_turn(family), family.multi


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_end_of_turn_marker_is_read_off_the_template_not_eos(family: Family) -> None:
    tokenizer = build_tokenizer(family)
    turn_end = find_turn_end(tokenizer)
    assert turn_end.marker == family.marker
    assert turn_end.final_tail == family.marker + family.trailing
    # Only Mistral closes turns with eos; for the others eos is another token entirely.
    assert (turn_end.marker == tokenizer.eos_token) == (family.name == "mistral")


@pytest.mark.parametrize(("family", "turns"), CASES)
def test_trained_tokens_are_exactly_each_answer_and_its_end_of_turn(family: Family, turns: str) -> None:
    tokenizer = build_tokenizer(family)
    messages, expected = conversation_and_expected(family, turns)
    # A prefix-preserving template needs no response_template; the others fall back to it.
    needs_fallback = turns == "multi" and not family.preserves_prefixes
    example = tokenize(tokenizer, messages, family.response_template if needs_fallback else None)
    assert loss_runs(tokenizer, example) == expected

    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert example.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    # Nothing after the last answer's marker is trained: not the newline, not a closing eos.
    last_trained = max(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    assert tokenizer.decode(example.input_ids[last_trained + 1 :]) == family.trailing
    assert text.endswith(expected[-1] + family.trailing)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_no_user_turn_system_text_or_header_is_trained(family: Family) -> None:
    tokenizer = build_tokenizer(family)
    messages = multi_turn(family)
    needs_fallback = not family.preserves_prefixes
    example = tokenize(tokenizer, messages, family.response_template if needs_fallback else None)
    trained = tokenizer.decode([label for label in example.labels if label != IGNORE_INDEX])
    for text in (QUESTION_1, QUESTION_2, SYSTEM, "user", "system", "assistant", "model"):
        assert text not in trained
    for token in family.special:
        if token != family.marker:
            assert token not in trained
    assert trained.count(family.marker) == 2
    assert family.eos not in trained or family.eos == family.marker


@pytest.mark.parametrize(("family", "turns"), CASES)
def test_response_template_fallback_gives_the_same_exact_spans(family: Family, turns: str) -> None:
    tokenizer = build_tokenizer(family, template=COUNT_HEADER + family.template)
    messages, expected = conversation_and_expected(family, turns)
    example = tokenize(tokenizer, messages, family.response_template)
    assert loss_runs(tokenizer, example) == expected
    derived = derive_response_template(tokenizer)  # what response_template=None uses
    if family.name == "mistral":  # no generation prompt to read a header from
        assert derived is None
        with pytest.raises(DatasetTokenizationError, match="does not preserve prefixes"):
            tokenize(tokenizer, messages, None)
    else:
        assert derived == family.response_template
        assert loss_runs(tokenizer, tokenize(tokenizer, messages, None)) == expected


def test_qwen3_strips_earlier_reasoning_and_the_fallback_trains_what_is_rendered() -> None:
    family = BY_NAME["qwen3-base"]
    tokenizer = build_tokenizer(family)
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": QUESTION_1},
        {"role": "assistant", "content": f"<think>\nA greeting.\n</think>\n\n{ANSWER_1}"},
        {"role": "user", "content": QUESTION_2},
        {"role": "assistant", "content": f"<think>\nTwo and two.\n</think>\n\n{ANSWER_2}"},
    ]
    example = tokenize(tokenizer, messages, None)  # the header comes from the generation prompt
    assert loss_runs(tokenizer, example) == [
        f"{ANSWER_1}<|im_end|>",
        f"<think>\nTwo and two.\n</think>\n\n{ANSWER_2}<|im_end|>",
    ]
    assert "A greeting." not in tokenizer.decode(example.input_ids)


def test_tokenize_dataset_probes_once_and_masks_like_tokenize_conversation() -> None:
    family = BY_NAME["qwen3-base"]
    tokenizer = build_tokenizer(family)
    records = [single_turn(), multi_turn(family)]
    examples, skipped = tokenize_dataset(
        tokenizer, records, max_length=None, response_template=family.response_template
    )
    assert skipped == 0
    assert [loss_runs(tokenizer, e) for e in examples] == [family.single, family.multi]


def test_given_turn_end_is_used_as_is() -> None:
    family = BY_NAME["chatml-qwen2.5-base"]
    tokenizer = build_tokenizer(family, template=COUNT_HEADER + family.template)
    turn_end = TurnEnd(marker="<|im_end|>", final_tail="<|im_end|>\n")
    assert find_turn_end(tokenizer) == turn_end
    example = tokenize_conversation(
        tokenizer, multi_turn(family), max_length=None, response_template=family.response_template, turn_end=turn_end
    )
    assert example is not None
    assert loss_runs(tokenizer, example) == family.multi


def test_template_that_adds_nothing_after_an_answer_is_a_clear_error() -> None:
    family = BY_NAME["chatml-qwen2.5-base"]
    bare = (
        "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    tokenizer = build_tokenizer(family, template=bare)
    for response_template in (None, "assistant: "):
        with pytest.raises(DatasetTokenizationError, match="end-of-turn marker: after an assistant message"):
            tokenize(tokenizer, single_turn(), response_template)


def test_template_that_separates_turns_only_before_the_next_one_is_a_clear_error() -> None:
    family = BY_NAME["chatml-qwen2.5-base"]
    # "<|im_end|>" opens every turn but the first, so nothing closes the last answer.
    leading = (
        "{% for message in messages %}{% if not loop.first %}{{ '<|im_end|>\\n' }}{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_end|>\\n<|im_start|>assistant\\n' }}{% endif %}"
    )
    tokenizer = build_tokenizer(family, template=leading)
    with pytest.raises(DatasetTokenizationError, match="end-of-turn marker"):
        find_turn_end(tokenizer)


def test_template_that_rewrites_answers_is_a_clear_error() -> None:
    family = BY_NAME["chatml-qwen2.5-base"]
    shouting = CHATML.replace("message['content']", "message['content'] | upper")
    tokenizer = build_tokenizer(family, template=shouting)
    with pytest.raises(DatasetTokenizationError, match="verbatim"):
        tokenize(tokenizer, single_turn(), family.response_template)


def test_template_that_requires_a_system_message_is_probed_with_one() -> None:
    family = BY_NAME["chatml-qwen2.5-base"]
    strict = (
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system message comes first') }}{% endif %}"
        + CHATML
    )
    tokenizer = build_tokenizer(family, template=strict)
    assert find_turn_end(tokenizer).marker == "<|im_end|>"
    assert loss_runs(tokenizer, tokenize(tokenizer, multi_turn(family), None)) == family.multi


def test_response_template_inside_a_user_message_is_an_error_not_a_trained_user_turn() -> None:
    family = BY_NAME["chatml-qwen2.5-base"]
    tokenizer = build_tokenizer(family, template=COUNT_HEADER + family.template)
    messages = single_turn()
    messages[0]["content"] = "Say <|im_start|>assistant\nplease"
    with pytest.raises(DatasetTokenizationError, match=r"starts 2 turns .* 1 assistant messages"):
        tokenize(tokenizer, messages, family.response_template)


def test_answer_not_closed_by_the_marker_is_an_error_in_the_fallback() -> None:
    family = BY_NAME["mistral"]
    tokenizer = build_tokenizer(family, template=COUNT_HEADER + family.template)
    messages = [*single_turn(), {"role": "user", "content": QUESTION_2}]  # "[/INST]" with no answer after it
    with pytest.raises(DatasetTokenizationError, match="not closed by the chat template's end-of-turn marker '</s>'"):
        tokenize(tokenizer, messages, family.response_template)
