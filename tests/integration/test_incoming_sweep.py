"""Nothing left behind in datasets/.incoming: what an API killed mid-upload left is swept at the next start and
periodically, by age; a live upload (even the finished first part of a two-part one) never is.

Real processes only: the API alone (uvicorn, no worker), raw HTTP over a socket, SIGKILL.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.data import easy_records, jsonl
from tests.service import Service, flush, wait_until

BOUNDARY = "sweepboundary"
HOUR = 3600


def _api(root: Path, redis_url: str, **env: str) -> Service:
    url = redis_url.rsplit("/", 1)[0] + "/10"  # a database of its own: no other fixture flushes it
    flush(url)
    svc = Service(base_path=root / "base", redis_url=url, log_dir=root / "logs", env_extra=env)
    svc.base_path.mkdir(parents=True)
    svc.log_dir.mkdir(parents=True)
    svc.start_api()
    svc.slot_elsewhere()  # no worker here (this is about the API): a slot announced elsewhere admits the uploads
    return svc


@pytest.fixture
def service_factory(tmp_path: Path, redis_url: str) -> Iterator[list[Service]]:
    started: list[Service] = []
    yield started
    for svc in started:
        svc.stop()


def _incoming(svc: Service) -> Path:
    return svc.base_path / "datasets" / ".incoming"


def _age(path: Path, seconds: float) -> None:
    """Make `path` look untouched for `seconds`."""
    then = time.time() - seconds
    os.utime(path, (then, then))


def _plant(folder: Path, name: str, size: int, *, age: float = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(b"x" * size)
    if age:
        _age(path, age)
    return path


def _file_part_head(name: str) -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; filename="d.jsonl"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()


def _request_head(path: str, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def _reply(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, body
        body += chunk
    return int(head.split(b" ")[1]), body


def test_a_partial_upload_of_a_killed_api_is_swept_at_the_next_start(
    tmp_path: Path, redis_url: str, service_factory: list[Service]
) -> None:
    svc = _api(tmp_path, redis_url)
    service_factory.append(svc)
    line = jsonl(easy_records(1))
    piece = line * (1_048_576 // len(line))  # about 1 MiB of records
    sock = socket.create_connection(("127.0.0.1", svc.port), timeout=30)
    try:
        sock.sendall(_request_head("/train", 200 * 1_048_576) + _file_part_head("file"))
        for _ in range(12):
            sock.sendall(piece)

        def spooled() -> list[Path] | None:
            files = list(_incoming(svc).glob("*.upload"))
            return files if files and files[0].stat().st_size >= 8 * 1_048_576 else None

        wait_until(spooled, timeout=30, ignoring=(FileNotFoundError,), what="the upload to be spooled")
        svc.kill_api()
    finally:
        sock.close()
    [partial] = list(_incoming(svc).iterdir())  # the killed request could not remove it
    size = partial.stat().st_size
    assert partial.suffix == ".upload" and size >= 8 * 1_048_576
    _age(partial, HOUR)  # the API stayed down an hour
    stale_part = _plant(_incoming(svc), "job-x.jsonl.part", 1000, age=HOUR)  # killed mid-validation, too
    fresh = _plant(_incoming(svc), "f" * 32 + ".upload", 10)  # another API process's live upload

    svc.start_api()
    assert not partial.exists() and not stale_part.exists()
    assert fresh.exists()  # fresh: another API process may be receiving it
    assert f"removed 2 stale upload file(s), {size + 1000} bytes" in svc.logs("api")
    # The service works on as before: a fresh upload is accepted and leaves nothing staged.
    r = svc.post("/v1/files", files={"file": ("d.jsonl", jsonl(easy_records(4)))}, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    assert list(_incoming(svc).iterdir()) == [fresh]


def test_a_stale_file_planted_while_the_api_runs_is_swept_within_the_period_and_a_fresh_one_stays(
    tmp_path: Path, redis_url: str, service_factory: list[Service]
) -> None:
    svc = _api(tmp_path, redis_url, LORA_INCOMING_SWEEP_INTERVAL_S="0.3")
    service_factory.append(svc)
    folder = _incoming(svc)
    stale = [_plant(folder, "a" * 32 + ".upload", 300, age=HOUR), _plant(folder, "b.jsonl.part", 200, age=HOUR)]
    fresh = _plant(folder, "c" * 32 + ".upload", 100, age=60)  # older than a minute, well inside ten
    wait_until(lambda: not any(p.exists() for p in stale), timeout=15, what="the stale files to be swept")
    time.sleep(1)  # a few more sweeps
    assert fresh.exists()
    assert "removed 2 stale upload file(s), 500 bytes" in svc.logs("api")


def test_a_live_two_part_upload_is_never_swept_even_past_the_age_bound(
    tmp_path: Path, redis_url: str, service_factory: list[Service], tiny_model_dir: Path
) -> None:
    """The bound is 4 s here (twice the idle timeout); the upload takes about 8 s, its first part done at once."""
    env = {"LORA_UPLOAD_IDLE_TIMEOUT_S": "2", "LORA_INCOMING_MAX_AGE_S": "0.5", "LORA_INCOMING_SWEEP_INTERVAL_S": "0.2"}
    svc = _api(tmp_path, redis_url, **env)
    service_factory.append(svc)
    validation = jsonl(easy_records(20))
    pieces = [
        validation[i : i + len(validation) // 20 + 1] for i in range(0, len(validation), len(validation) // 20 + 1)
    ]
    config = json.dumps({"model_name": str(tiny_model_dir), "epochs": 1})
    config_part = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="config"\r\n\r\n{config}\r\n'.encode()
    body = config_part + _file_part_head("file") + jsonl(easy_records(8)) + b"\r\n" + _file_part_head("validation_file")
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    length = len(body) + len(validation) + len(tail)
    with socket.create_connection(("127.0.0.1", svc.port), timeout=30) as sock:
        sock.sendall(_request_head("/train", length) + body)
        started = time.monotonic()
        for piece in pieces:
            time.sleep(0.4)  # never idle for the 2 s timeout, but long past the 4 s bound in all
            sock.sendall(piece)
        assert time.monotonic() - started > 6
        stale = _plant(_incoming(svc), "d" * 32 + ".upload", 10, age=HOUR)
        wait_until(lambda: not stale.exists(), timeout=10, what="the sweeper to run")  # it does run meanwhile
        assert len(list(_incoming(svc).glob("*.upload"))) == 2  # both parts are still there
        sock.sendall(tail)
        status, reply = _reply(sock)
    assert status == 202, reply
    assert not list(_incoming(svc).iterdir())
