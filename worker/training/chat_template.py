"""What a chat template says about a conversation: how it renders, how it closes an assistant turn
(the end-of-turn marker, read off its own renders), and which header starts one.

The marker: a probe conversation whose assistant content is a sentinel is rendered followed by a
user turn, as the last message, and with a generation prompt; the tokens that follow the sentinel
in all of these, stripped of whitespace, are the marker (`<|im_end|>`, `<|eot_id|>`,
`<end_of_turn>`, `<|end|>`, or `</s>` where the template closes turns with eos). A template that
renders only whitespace there has no turn end to learn, and one the probe cannot render is not
guessed at: both are a `DatasetTokenizationError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Messages = list[dict[str, Any]]


# Probe contents: plain words that templates pass through unchanged (no whitespace to trim).
_PROBE_SYSTEM = "loraprobesystem"
_PROBE_USER = "loraprobeuser"
_PROBE_ANSWER = "loraprobeanswer"
_PROBE_NEXT = "loraprobenext"


class DatasetTokenizationError(ValueError):
    """The dataset cannot be tokenized with this tokenizer (and response_template)."""


@dataclass(frozen=True, slots=True)
class TurnEnd:
    """How a chat template closes an assistant turn, as read off its own renders."""

    marker: str  # the end-of-turn text, e.g. "<|im_end|>"; trained on, as the last token of a turn
    final_tail: str  # all the template renders after a conversation's last assistant content

    @property
    def marker_end_in_final_tail(self) -> int:
        return self.final_tail.index(self.marker) + len(self.marker)


def find_turn_end(tokenizer: PreTrainedTokenizerBase) -> TurnEnd:
    """Derive the chat template's end-of-turn marker from renders of a probe conversation."""
    check_tokenizer(tokenizer)
    tails = _probe_tails(tokenizer)
    common = common_token_prefix(tokenizer, tails)
    marker = common.strip()
    if not marker:
        raise DatasetTokenizationError(
            "cannot find the chat template's end-of-turn marker: after an assistant message's content it renders "
            f"nothing but whitespace before what comes next ({tails!r}), so an assistant turn has no end to train on; "
            "use a chat template that closes each assistant turn with an end-of-turn token"
        )
    return TurnEnd(marker=marker, final_tail=tails[0])


def derive_response_template(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The text that starts an assistant turn, read from the template's generation prompt: what the
    render with the prompt adds after the user's turn (some templates end a finished conversation with
    eos instead, so the two renders are compared after their common tokens). None when there is none."""
    content = "Hi there"
    probe: Messages = [{"role": "user", "content": content}]
    try:
        without = render(tokenizer, probe)
        with_prompt = render(tokenizer, probe, add_generation_prompt=True)
    except Exception:  # a template may refuse the probe
        return None
    try:
        common = len(common_token_prefix(tokenizer, [without, with_prompt]))
    except DatasetTokenizationError:
        return None
    header = with_prompt[common:]
    if with_prompt.find(content) + len(content) > common or not header.strip():
        return None
    return header


def render(
    tokenizer: PreTrainedTokenizerBase,
    messages: Messages,
    *,
    add_generation_prompt: bool = False,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    text = tokenizer.apply_chat_template(
        messages,
        tools=tools or None,  # type: ignore[arg-type]  # JSON tool schemas, as transformers documents them
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )
    if not isinstance(text, str):  # tokenize=False always gives a str; keep mypy honest
        raise DatasetTokenizationError(f"chat template rendered {type(text).__name__}, not str")
    return text


def _probe_tails(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """What the template renders after a probe answer: at the end, then before a user turn, then
    before a generation prompt (left out when the template refuses one after an answer).

    Tried without a system message first, then with one, for templates that require either.
    """
    failure: Exception | None = None
    for head in ([], [{"role": "system", "content": _PROBE_SYSTEM}]):
        answered = [*head, {"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_ANSWER}]
        try:
            final = render(tokenizer, answered)
            followed = render(tokenizer, [*answered, {"role": "user", "content": _PROBE_NEXT}])
        except Exception as exc:  # a template may refuse a role (Gemma: system) or an order
            failure = exc
            continue
        tails = [_after_answer(final), _after_answer(followed, until=_PROBE_NEXT)]
        try:
            prompted = render(tokenizer, answered, add_generation_prompt=True)
        except Exception:  # optional: the other two already delimit the marker
            return tails
        return [*tails, _after_answer(prompted)]
    raise DatasetTokenizationError(
        "cannot find the chat template's end-of-turn marker: it failed to render the probe conversation "
        f"(user, assistant, user): {failure}"
    ) from failure


def _after_answer(rendered: str, *, until: str | None = None) -> str:
    """The text after the probe answer in `rendered` (up to the `until` probe content, if given)."""
    if rendered.count(_PROBE_ANSWER) != 1:
        raise DatasetTokenizationError(
            "cannot find the chat template's end-of-turn marker: it does not render an assistant message's content "
            f"verbatim exactly once (probe answer {_PROBE_ANSWER!r} rendered as {rendered!r})"
        )
    tail = rendered[rendered.index(_PROBE_ANSWER) + len(_PROBE_ANSWER) :]
    if until is not None:
        cut = tail.find(until)
        if cut == -1:
            raise DatasetTokenizationError(
                "cannot find the chat template's end-of-turn marker: it does not render a user message's content "
                f"verbatim (probe {until!r} rendered as {rendered!r})"
            )
        tail = tail[:cut]
    return tail


def common_token_prefix(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> str:
    """The longest run of whole tokens all `texts` start with.

    Compared by token, not by character, so a marker is never cut inside or extended into a
    special token: Phi-3's "<|end|>\\n<|user|>" and "<|end|>\\n<|endoftext|>" share "<|end|>\\n",
    not "<|end|>\\n<|".
    """
    encodings = [tokenizer(text, add_special_tokens=False, return_offsets_mapping=True) for text in texts]
    ids = [list(encoding["input_ids"]) for encoding in encodings]
    n = 0
    while all(len(seq) > n and seq[n] == ids[0][n] for seq in ids):
        n += 1
    if n == 0:
        return ""
    prefix = texts[0][: encodings[0]["offset_mapping"][n - 1][1]]
    if not all(text.startswith(prefix) for text in texts):  # token ids agree but their text does not
        raise DatasetTokenizationError(
            f"cannot find the chat template's end-of-turn marker: the renders after an assistant message {texts!r} "
            "share tokens but not text"
        )
    return prefix


def check_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DatasetTokenizationError(
            "the tokenizer has no chat template; use a chat/instruct model or a tokenizer that defines `chat_template`"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise DatasetTokenizationError(
            "loss masking needs a fast (Rust `tokenizers`) tokenizer with offset mapping; "
            f"{type(tokenizer).__name__} is not one"
        )
