"""A client that stops sending mid-upload is cut off and leaves nothing behind."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service import Service, flush


@pytest.fixture
def impatient(tmp_path: Path, redis_url: str) -> Iterator[Service]:
    flush(redis_url)
    svc = Service(tmp_path / "base", redis_url, tmp_path / "logs", env_extra={"LORA_UPLOAD_IDLE_TIMEOUT_S": "1.5"})
    svc.start()
    yield svc
    svc.stop()


def test_stalled_upload_gets_408_and_no_partial_file(impatient: Service) -> None:
    head = (
        "POST /train HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=B\r\n"
        'Content-Length: 100000\r\n\r\n--B\r\nContent-Disposition: form-data; name="file"; filename="d"\r\n\r\n'
        '{"messages": [{"role": "user", "content": "hi"}'
    )
    with socket.create_connection(("127.0.0.1", impatient.port), timeout=30) as sock:
        sock.sendall(head.encode())
        time.sleep(0.5)
        incoming = impatient.base_path / "datasets" / ".incoming"
        assert len(list(incoming.iterdir())) == 1  # the upload is being spooled
        started = time.monotonic()
        reply = ""
        while "\r\n\r\n" not in reply or not reply.rstrip().endswith("}"):  # headers and the JSON body
            chunk = sock.recv(4096).decode()
            if not chunk:
                break
            reply += chunk
    assert reply.startswith("HTTP/1.1 408"), reply
    assert "no upload data for 1.5 s" in reply
    assert time.monotonic() - started < 10
    assert not list(incoming.iterdir())
    assert impatient.get("/status").json()["status"] == "idle"
