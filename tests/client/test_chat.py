"""Reading a streamed chat completion and `/v1/models` on the client's side, from OpenAI's wire format.

The service's own answers are checked end to end in tests/integration/test_cli_client.py; these pin
the format's corners (an error inside the stream, a stream cut short) that a real server rarely shows.
"""

from __future__ import annotations

import http.server
import json
import threading
from typing import Any

import httpx
import pytest

from client import ApiClientError, ChatStreamError, LoraClient
from client.chat import TerminalStream, terminal_safe


def _sse(*payloads: Any) -> bytes:
    return "".join(f"data: {p if isinstance(p, str) else json.dumps(p)}\n\n" for p in payloads).encode()


def _delta(text: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": text}}],
    }


def _client(handler: Any) -> LoraClient:
    return LoraClient("http://test", api_key="k", transport=httpx.MockTransport(handler))


def test_chat_stream_yields_each_piece_and_sends_only_the_options_given() -> None:
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/chat/completions"
        assert request.headers["authorization"] == "Bearer k"
        seen.append(json.loads(request.content))
        role = {"choices": [{"index": 0, "delta": {"role": "assistant"}}]}
        end = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        body = b": keep-alive\n\n" + _sse(role, _delta("It "), _delta("is blue."), end, "[DONE]")
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    with _client(handler) as client:
        assert list(client.chat_stream("job-abc", "What color?", system="Be brief.", max_tokens=5)) == [
            "It ",
            "is blue.",
        ]
        assert list(client.chat_stream("job-abc", [{"role": "user", "content": "Hi"}])) == ["It ", "is blue."]
    assert seen[0] == {
        "model": "job-abc",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What color?"}],
        "stream": True,
        "max_tokens": 5,
    }
    assert "temperature" not in seen[1] and seen[1]["messages"] == [{"role": "user", "content": "Hi"}]


def test_chat_stream_raises_on_an_error_inside_the_stream_and_on_a_stream_cut_short() -> None:
    bodies = [
        _sse(_delta("It "), {"error": {"message": "the generation worker died", "code": "generation_failed"}}),
        _sse(_delta("It ")),
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=bodies.pop(0), headers={"content-type": "text/event-stream"})

    with _client(handler) as client:
        with pytest.raises(ChatStreamError, match="worker died") as failed:
            list(client.chat_stream("job-abc", "q"))
        assert failed.value.code == "generation_failed"
        with pytest.raises(ChatStreamError, match="before its end"):
            list(client.chat_stream("job-abc", "q"))


def test_refusals_in_openais_envelope_carry_their_message() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        error = {
            "message": "The model 'nope' does not exist",
            "type": "invalid_request_error",
            "code": "model_not_found",
        }
        return httpx.Response(404, json={"error": error})

    with _client(handler) as client:
        with pytest.raises(ApiClientError, match="does not exist") as refused:
            list(client.chat_stream("nope", "q"))
        assert refused.value.status_code == 404
        with pytest.raises(ApiClientError, match="HTTP 404: The model 'nope' does not exist"):
            client.models()


def test_models_lists_ids_with_owner_and_creation_time() -> None:
    listing = {
        "object": "list",
        "data": [
            {"id": "ft:tiny::job-abc", "object": "model", "created": 1700000000, "owned_by": "org-lora-server"},
            {"id": "Qwen/Qwen2.5-0.5B", "object": "model", "created": 1690000000, "owned_by": "system", "extra": 1},
        ],
    }
    with _client(lambda request: httpx.Response(200, json=listing)) as client:
        models = client.models()
    assert [(m.id, m.owned_by, m.created) for m in models.data] == [
        ("ft:tiny::job-abc", "org-lora-server", 1700000000),
        ("Qwen/Qwen2.5-0.5B", "system", 1690000000),
    ]


# --------------------------------------------------------------------------- what reaches the terminal

HOSTILE = [
    ("red \x1b[31mtext\x1b[0m", "red text"),  # colours
    ("\x1b]0;owned\x07title", "title"),  # the window's title
    ("\x1b]8;;http://evil\x1b\\link\x1b]8;;\x1b\\", "link"),  # a hyperlink
    ("bell\x07 back\x08space", "bell backspace"),
    ("over\rwrite", "overwrite"),  # \r would print over the line
    ("line\r\nnext", "line\nnext"),
    ("\x1bcreset", "reset"),  # ESC c resets the terminal
    ("\x9b2Jc1 csi", "c1 csi"),  # the one-byte C1 form of ESC [
    ("nul\x00 del\x7f", "nul del"),
    ("\u202eright-to-left override", "right-to-left override"),
    ("tab\tand\nnewline kept; é 中 😀 too", "tab\tand\nnewline kept; é 中 😀 too"),
]


@pytest.mark.parametrize(("text", "shown"), HOSTILE, ids=[repr(t) for t, _ in HOSTILE])
def test_terminal_safe_drops_escape_sequences_and_controls_but_newlines_and_tabs(text: str, shown: str) -> None:
    assert terminal_safe(text) == shown


def test_a_sequence_split_across_pieces_is_dropped_whole() -> None:
    stream = TerminalStream()
    pieces = ["hi \x1b", "[3", "1mred\x1b]0;ti", "tle\x07 done", "\x1b"]
    assert "".join(stream.feed(p) for p in pieces) + stream.flush() == "hi red done"


class _Chat(http.server.BaseHTTPRequestHandler):
    """A chat completions endpoint whose model answers with escape sequences and control characters."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        pieces = ["It \x1b[2J\x1b[H", "is \x1b]0;pwned\x07blue", ".\x07\r\nDone\x1b", "[0m\tok"]
        body = _sse(*(_delta(p) for p in pieces), "[DONE]")
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_the_chat_command_prints_the_answer_without_its_control_characters(
    capsysbinary: pytest.CaptureFixture[bytes],
) -> None:
    from cli.main import main

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Chat)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        code = main(["chat", "job-abc", "What color?", "--url", f"http://127.0.0.1:{server.server_port}"])
    finally:
        server.shutdown()
        thread.join()
        server.server_close()
    assert code == 0
    assert capsysbinary.readouterr().out.decode() == "It is blue.\nDone\tok\n"
