"""Preference records (OpenAI's DPO data) checked and normalised, and which kind of data a method trains on.

One line of OpenAI's DPO JSON Lines::

    {"input": {"messages": [...], "tools": [...]?, "parallel_tool_calls": bool?},
     "preferred_output": [{"role": "assistant", "content": "..."}],
     "non_preferred_output": [{"role": "assistant", "content": "..."}]}

`to_preference(record)` returns the normalised record (``input`` as chat messages and tools the
way `shared.chat_formats` normalises them, each output one assistant message) or why it is invalid.
A dataset is either all chat records or all preference records (`DataKind`); supervised training
reads chat data, DPO preference data (`kind_problem`).
"""

from __future__ import annotations

from typing import Any, Literal

from shared.chat_formats import Message, check_conversation, normalise_messages, normalise_tools
from shared.config import TrainingMethod as Method

DataKind = Literal["chat", "preference"]  # chat: any shared.chat_formats shape; preference: DPO pairs
# {"input": {"messages", "tools"?}, "preferred_output": [message], "non_preferred_output": [message]}
PreferenceRecord = dict[str, Any]

PREFERENCE_KEYS = ("input", "preferred_output", "non_preferred_output")
KIND_OF_METHOD: dict[Method, DataKind] = {"sft": "chat", "dpo": "preference"}
_KIND_WORDS: dict[DataKind, str] = {
    "chat": "chat records (supervised data)",
    "preference": "preference records (DPO data: input, preferred_output, non_preferred_output)",
}


def is_preference(record: Any) -> bool:
    """Whether the record is meant as a preference pair: it names either output (any other shape is chat)."""
    return isinstance(record, dict) and ("preferred_output" in record or "non_preferred_output" in record)


def kind_of(record: Any) -> DataKind:
    return "preference" if is_preference(record) else "chat"


def kind_problem(kind: DataKind, method: Method) -> str | None:
    """Why a dataset of `kind` cannot train `method` (None when it can)."""
    wanted = KIND_OF_METHOD[method]
    if kind == wanted:
        return None
    name = "dpo" if method == "dpo" else "supervised"
    return f"the file holds {_KIND_WORDS[kind]}, but {name} training needs {_KIND_WORDS[wanted]}"


def mixed_kinds_reason(first: DataKind, this: DataKind, first_where: str) -> str:
    return (
        f"a {this} record, but the file's first record ({first_where}) is a {first} record: a file holds either "
        f"{_KIND_WORDS['chat']} or {_KIND_WORDS['preference']}, not both"
    )


class _Invalid(ValueError):
    pass


def to_preference(record: Any) -> tuple[PreferenceRecord | None, str | None]:
    """The record as a normalised preference pair, or the reason it is invalid."""
    try:
        return _preference(record), None
    except ValueError as exc:  # ours and shared.chat_formats' reasons
        return None, str(exc)


def _preference(record: Any) -> PreferenceRecord:
    if not isinstance(record, dict):
        raise _Invalid(f"expected an object (one preference pair), got {type(record).__name__}")
    missing = [key for key in PREFERENCE_KEYS if key not in record]
    if missing:
        raise _Invalid(f"a preference record needs {', '.join(map(repr, PREFERENCE_KEYS))}; missing {missing}")
    unknown = [key for key in record if key not in PREFERENCE_KEYS]
    if unknown:
        raise _Invalid(f"unknown keys {', '.join(map(repr, unknown[:12]))} in a preference record")
    raw_input = record["input"]
    if not isinstance(raw_input, dict):
        raise _Invalid("'input' must be an object with 'messages' (and optionally 'tools', 'parallel_tool_calls')")
    parallel = raw_input.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise _Invalid("input.parallel_tool_calls must be true or false")
    messages = normalise_messages(raw_input.get("messages"), "input.messages")
    if any("weight" in m for m in messages):
        raise _Invalid("input.messages: a weight has no meaning in a preference record's input")
    tools = normalise_tools(raw_input.get("tools"))
    preferred = _output(record["preferred_output"], "preferred_output")
    rejected = _output(record["non_preferred_output"], "non_preferred_output")
    if messages[-1]["role"] not in ("user", "tool"):
        raise _Invalid(
            f"input.messages[{len(messages) - 1}].role is {messages[-1]['role']!r}: the input must end with a user "
            "(or tool) message, which the outputs answer"
        )
    reason = check_conversation([*messages, preferred])
    if reason is not None:
        raise _Invalid(f"input.{reason}" if reason.startswith("messages[") else reason)
    if preferred == rejected:
        raise _Invalid("preferred_output and non_preferred_output are the same: there is no preference to learn")
    out: PreferenceRecord = {"input": {"messages": messages}, "preferred_output": [preferred],
                             "non_preferred_output": [rejected]}  # fmt: skip
    if tools:
        out["input"]["tools"] = tools
    return out


def _output(raw: Any, where: str) -> Message:
    if not isinstance(raw, list) or len(raw) != 1:
        raise _Invalid(f"'{where}' must be a list of exactly one assistant message")
    (message,) = normalise_messages(raw, where)
    if message["role"] != "assistant":
        raise _Invalid(f"{where}[0].role is {message['role']!r}: an output is an assistant message")
    if "weight" in message:
        raise _Invalid(f"{where}[0].weight: outputs carry no weight")
    return message
