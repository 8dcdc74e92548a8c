"""Every accepted dataset shape becomes the same chat form; invalid records say which field and why."""

from __future__ import annotations

from typing import Any

import pytest

from shared.chat_formats import detect_shape, to_chat

CHAT = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]


@pytest.mark.parametrize(
    ("record", "shape", "messages"),
    [
        ({"messages": CHAT}, "chat", CHAT),
        ({"prompt": "What is 2+2?", "completion": "4."}, "prompt_completion", CHAT),
        ({"prompt": [CHAT[0]], "completion": [CHAT[1]]}, "prompt_completion", CHAT),
        ({"query": "What is 2+2?", "response": "4."}, "query_response", CHAT),
        (
            {"query": "And 3+3?", "response": "6.", "history": [["What is 2+2?", "4."]], "system": "Be brief."},
            "query_response",
            [{"role": "system", "content": "Be brief."}, *CHAT,
             {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6."}],
        ),
        ({"instruction": "What is 2+2?", "input": "", "output": "4."}, "alpaca", CHAT),
        (
            {"instruction": "Add the numbers.", "input": "2 and 2", "output": "4."},
            "alpaca",
            [{"role": "user", "content": "Add the numbers.\n\n2 and 2"}, CHAT[1]],
        ),
        ({"conversations": [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "4."}]}, "sharegpt", CHAT),
    ],
)  # fmt: skip
def test_each_shape_becomes_chat(record: dict[str, Any], shape: str, messages: list[dict[str, Any]]) -> None:
    assert detect_shape(record) == shape
    assert to_chat(record) == ({"messages": messages}, None)


def test_openai_chat_with_tools_names_weights_and_developer_role() -> None:
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    record = {
        "messages": [
            {"role": "developer", "content": "Use tools."},
            {"role": "user", "content": [{"type": "text", "text": "2+2"}, {"type": "text", "text": "?"}], "name": "ann"},
            {"role": "assistant", "content": "Let me think.", "weight": 0},
            {"role": "user", "content": "Go on."},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'}}]},
            {"role": "tool", "content": "4", "tool_call_id": "c1"},
            {"role": "assistant", "content": "4.", "weight": 1},
        ],
        "tools": tools,
    }  # fmt: skip
    chat, reason = to_chat(record)
    assert reason is None and chat is not None
    messages = chat["messages"]
    assert messages[0] == {"role": "system", "content": "Use tools."}
    assert messages[1] == {"role": "user", "content": "2+2?", "name": "ann"}
    assert messages[2]["weight"] == 0 and messages[6]["weight"] == 1
    assert messages[4]["tool_calls"] == [
        {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}, "id": "c1"}
    ]
    assert messages[4]["content"] == "" and messages[5] == {"role": "tool", "content": "4", "tool_call_id": "c1"}
    assert chat["tools"] == tools


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"messages": [CHAT[0], {**CHAT[1], "weight": 2}]}, "messages[1].weight must be 0 or 1"),
        ({"messages": [{**CHAT[0], "weight": 0}, CHAT[1]]}, "messages[0].weight: only assistant messages carry a weight"),
        ({"messages": [CHAT[0], {**CHAT[1], "weight": 0}]}, "every assistant message has weight 0"),
        ({"messages": [CHAT[0], {"role": "tool", "content": "4"}, CHAT[1]]}, "messages[1].role is 'tool': a tool result"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}, CHAT[1]]},
         "messages[0].content[0]: only text content parts"),
        ({"messages": [CHAT[0], {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}]},
         "messages[1].tool_calls[0].function.arguments is not valid JSON"),
        ({"prompt": "q", "completion": 3}, "completion must be a string"),
        ({"query": "q", "response": "a", "history": [["only one"]]}, "history[0] must be a [query, response] pair"),
        ({"conversations": [{"from": "alien", "value": "q"}]}, "conversations[0].from 'alien' is not one of"),
        ({"instruction": "q", "output": ""}, "messages[1].content is empty"),
        ({"messages": CHAT, "tools": [{"type": "function"}]}, "tools[0] must name its function"),
        ({"text": "q"}, "no known record shape: keys 'text'"),
    ],
)  # fmt: skip
def test_invalid_records_say_where_and_why(record: dict[str, Any], reason: str) -> None:
    chat, got = to_chat(record)
    assert chat is None and got is not None and reason in got
