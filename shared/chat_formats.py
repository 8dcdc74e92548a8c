"""Dataset records as people have them, turned into one chat form: ``{"messages": [...], "tools": [...]}``.

Shapes, recognised by their keys (`detect_shape`):

- ``chat``: OpenAI chat fine-tuning records, ``{"messages": [...], "tools": [...]}``: roles system,
  developer (treated as system), user, assistant, tool; ``name``; assistant ``tool_calls``;
  ``tool_call_id``; assistant ``weight`` 0/1 (0 keeps the turn out of the loss); text content parts.
- ``prompt_completion``: ``{"prompt": ..., "completion": ...}``, as strings or as message lists.
- ``query_response``: ``{"query", "response", "history": [[q, a], ...], "system"}`` (the seed's example data).
- ``alpaca``: ``{"instruction", "input", "output", "system"}``.
- ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|"system"|..., "value": ...}], "system", "tools"}``.

`to_chat(record)` returns the normalised record or the reason it is invalid. Normalised messages
keep only role, content and, where given, name, tool_calls (arguments decoded to objects, as chat
templates expect), tool_call_id and weight.
"""

from __future__ import annotations

import json
from typing import Any, Literal

Shape = Literal["chat", "prompt_completion", "query_response", "alpaca", "sharegpt"]
Message = dict[str, Any]
ChatRecord = dict[str, Any]  # {"messages": [Message, ...], "tools": [...]?}

SHAPE_KEYS: dict[Shape, tuple[str, ...]] = {
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "query_response": ("query", "response"),
    "alpaca": ("instruction", "output"),
    "sharegpt": ("conversations",),
}
ACCEPTED_SHAPES = (
    "chat {messages, tools?}; prompt/completion {prompt, completion}; query/response {query, response, history?, "
    "system?}; Alpaca {instruction, input?, output, system?}; ShareGPT {conversations: [{from, value}], system?}"
)
ROLES = ("system", "developer", "user", "assistant", "tool")
_SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
    "system": "system", "observation": "tool", "tool": "tool", "function_call": "assistant",
}  # fmt: skip


def detect_shape(record: Any) -> Shape | None:
    """The shape whose required keys the record has (None: not an object, or no known shape)."""
    if not isinstance(record, dict):
        return None
    for shape, keys in SHAPE_KEYS.items():
        if all(key in record for key in keys):
            return shape
    return None


def unknown_shape_reason(record: Any) -> str:
    if not isinstance(record, dict):
        return f"expected an object (one conversation), got {type(record).__name__}; accepted shapes: {ACCEPTED_SHAPES}"
    keys = ", ".join(repr(k) for k in list(record)[:12]) or "none"
    return f"no known record shape: keys {keys}; accepted shapes: {ACCEPTED_SHAPES}"


def to_chat(record: Any) -> tuple[ChatRecord | None, str | None]:
    """The record as normalised chat, or the reason it is invalid."""
    shape = detect_shape(record)
    if shape is None:
        return None, unknown_shape_reason(record)
    try:
        messages, tools = _CONVERTERS[shape](record)
    except _Invalid as exc:
        return None, str(exc)
    reason = check_conversation(messages)
    if reason is not None:
        return None, reason
    out: ChatRecord = {"messages": messages}
    if tools:
        out["tools"] = tools
    return out, None


class _Invalid(ValueError):
    pass


def _text(value: Any, where: str) -> str:
    """A string, or OpenAI's list of text parts joined; anything else is invalid."""
    if isinstance(value, list):
        parts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _Invalid(f"{where}[{i}]: only text content parts ({{'type': 'text', 'text': ...}}) are supported")
            parts.append(part["text"])
        value = "".join(parts)
    if not isinstance(value, str):
        raise _Invalid(f"{where} must be a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _Invalid(f"{where} is not valid Unicode (a lone surrogate escape)") from None
    return value


def _message(raw: Any, where: str) -> Message:
    if not isinstance(raw, dict):
        raise _Invalid(f"{where} must be an object with 'role' and 'content'")
    role = raw.get("role")
    if not isinstance(role, str):
        raise _Invalid(f"{where}.role must be a string")
    if role not in ROLES:
        shown = repr(role) if len(role) <= 40 else repr(role[:40]) + "..."
        raise _Invalid(f"{where}.role {shown} is not one of {', '.join(ROLES)}")
    message: Message = {"role": "system" if role == "developer" else role}
    calls = raw.get("tool_calls")
    if calls is not None:
        if role != "assistant":
            raise _Invalid(f"{where}.tool_calls: only assistant messages make tool calls")
        message["tool_calls"] = _tool_calls(calls, f"{where}.tool_calls")
    content = raw.get("content")
    if content is None and calls is not None:
        content = ""
    message["content"] = _text(content, f"{where}.content")
    if not message["content"].strip() and calls is None:
        raise _Invalid(f"{where}.content is empty")
    for key in ("name", "tool_call_id"):
        if raw.get(key) is not None:
            message[key] = _text(raw[key], f"{where}.{key}")
    if "weight" in raw:
        weight = raw["weight"]
        if role != "assistant":
            raise _Invalid(f"{where}.weight: only assistant messages carry a weight")
        if isinstance(weight, bool) or weight not in (0, 1):
            raise _Invalid(f"{where}.weight must be 0 or 1")
        message["weight"] = int(weight)
    return message


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(calls, list) or not calls:
        raise _Invalid(f"{where} must be a non-empty list")
    out = []
    for i, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _Invalid(f"{where}[{i}] must be {{'type': 'function', 'function': {{'name', 'arguments'}}}}")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                raise _Invalid(f"{where}[{i}].function.arguments is not valid JSON") from None
        if not isinstance(arguments, dict):
            raise _Invalid(f"{where}[{i}].function.arguments must be a JSON object")
        entry: dict[str, Any] = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        out.append(entry)
    return out


def _tools(tools: Any) -> list[dict[str, Any]]:
    if tools is None:
        return []
    if isinstance(tools, str):  # ShareGPT keeps them as a JSON string
        try:
            tools = json.loads(tools)
        except ValueError:
            raise _Invalid("tools is not valid JSON") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise _Invalid("tools must be a list of {'type': 'function', 'function': {...}} objects")
    for i, tool in enumerate(tools):
        function = tool.get("function", tool)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _Invalid(f"tools[{i}] must name its function")
    return tools


def _messages(raw: Any, where: str) -> list[Message]:
    if not isinstance(raw, list) or not raw:
        raise _Invalid(f"'{where}' must be a non-empty list")
    return [_message(m, f"{where}[{i}]") for i, m in enumerate(raw)]


def normalise_messages(raw: Any, where: str) -> list[Message]:
    """A non-empty list of messages, normalised; ValueError saying what is wrong (for other record kinds)."""
    return _messages(raw, where)


def normalise_tools(raw: Any) -> list[dict[str, Any]]:
    """A tools list (None: none), checked; ValueError saying what is wrong."""
    return _tools(raw)


def _system(record: dict[str, Any]) -> list[Message]:
    system = record.get("system")
    if system is None or (isinstance(system, str) and not system.strip()):
        return []
    return [{"role": "system", "content": _text(system, "system")}]


def _from_chat(record: dict[str, Any]) -> tuple[list[Message], list[dict[str, Any]]]:
    return _messages(record["messages"], "messages"), _tools(record.get("tools"))


def _from_prompt_completion(record: dict[str, Any]) -> tuple[list[Message], list[dict[str, Any]]]:
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, list) or isinstance(completion, list):  # conversational prompt/completion
        return _messages(prompt, "prompt") + _messages(completion, "completion"), _tools(record.get("tools"))
    user = _text(prompt, "prompt")
    return [*_system(record), {"role": "user", "content": user},
            {"role": "assistant", "content": _text(completion, "completion")}], []  # fmt: skip


def _from_query_response(record: dict[str, Any]) -> tuple[list[Message], list[dict[str, Any]]]:
    messages = _system(record)
    history = record.get("history") or []
    if not isinstance(history, list):
        raise _Invalid("history must be a list of [query, response] pairs")
    for i, pair in enumerate(history):
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise _Invalid(f"history[{i}] must be a [query, response] pair")
        messages.append({"role": "user", "content": _text(pair[0], f"history[{i}][0]")})
        messages.append({"role": "assistant", "content": _text(pair[1], f"history[{i}][1]")})
    messages.append({"role": "user", "content": _text(record["query"], "query")})
    messages.append({"role": "assistant", "content": _text(record["response"], "response")})
    return messages, []


def _from_alpaca(record: dict[str, Any]) -> tuple[list[Message], list[dict[str, Any]]]:
    instruction = _text(record["instruction"], "instruction")
    extra = record.get("input")
    if extra is not None and _text(extra, "input").strip():
        instruction = f"{instruction}\n\n{extra}"
    return [*_system(record), {"role": "user", "content": instruction},
            {"role": "assistant", "content": _text(record["output"], "output")}], []  # fmt: skip


def _from_sharegpt(record: dict[str, Any]) -> tuple[list[Message], list[dict[str, Any]]]:
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise _Invalid("'conversations' must be a non-empty list")
    messages = _system(record)
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str):
            raise _Invalid(f"conversations[{i}] must be an object with 'from' and 'value'")
        role = _SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise _Invalid(f"conversations[{i}].from {turn['from'][:40]!r} is not one of {', '.join(_SHAREGPT_ROLES)}")
        messages.append({"role": role, "content": _text(turn.get("value"), f"conversations[{i}].value")})
    return messages, _tools(record.get("tools"))


_CONVERTERS = {
    "chat": _from_chat,
    "prompt_completion": _from_prompt_completion,
    "query_response": _from_query_response,
    "alpaca": _from_alpaca,
    "sharegpt": _from_sharegpt,
}


def check_conversation(messages: list[Message]) -> str | None:
    """Order and content rules every conversation must meet, whatever shape it came in."""
    previous: str | None = None
    for i, message in enumerate(messages):
        role = message["role"]
        if not message["content"].strip() and "tool_calls" not in message:
            return f"messages[{i}].content is empty"
        if role == "system":
            if i != 0:
                return f"messages[{i}].role is 'system': a system message may only come first"
        elif role == "user":
            if previous == "user":
                return f"messages[{i}].role is 'user', expected 'assistant' (turns alternate user/assistant)"
        elif role == "assistant":
            if previous not in ("user", "tool"):
                return f"messages[{i}].role is 'assistant', expected 'user' (turns alternate user/assistant)"
        elif (
            role == "tool" and previous != "tool" and not (previous == "assistant" and "tool_calls" in messages[i - 1])
        ):
            return f"messages[{i}].role is 'tool': a tool result must follow an assistant message with tool_calls"
        previous = role
    if previous != "assistant":
        return "the conversation must end with an assistant message"
    if all(m.get("weight") == 0 for m in messages if m["role"] == "assistant"):
        return "every assistant message has weight 0: nothing to train on"
    return None
