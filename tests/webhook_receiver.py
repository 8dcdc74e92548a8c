"""A real HTTP webhook receiver for tests: a threaded `http.server` on a free port that records every
request and answers as its `answer` callable says (a status code, after an optional delay)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    status: int  # what the receiver answered
    at: float  # time.monotonic() when it arrived


# Given the number of requests received before this one: (status, seconds to wait before answering).
Answer = Callable[[int], tuple[int, float]]


def accept(_: int) -> tuple[int, float]:
    return 200, 0.0


@dataclass
class Receiver:
    url: str
    received: list[Received] = field(default_factory=list)  # in the order answered
    requests: int = 0  # requests started

    def accepted(self) -> list[Received]:
        return [r for r in self.received if 200 <= r.status < 300]


@contextmanager
def webhook_receiver(answer: Answer = accept) -> Iterator[Receiver]:
    lock = threading.Lock()
    receiver = Receiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            at = time.monotonic()
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            with lock:
                status, delay = answer(receiver.requests)
                receiver.requests += 1
            time.sleep(delay)  # past the sender's timeout, the sender has seen a failure whatever comes next
            headers = {k.lower(): v for k, v in self.headers.items()}
            with lock:
                receiver.received.append(Received(self.path, headers, body, status, at))
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
