"""Hostile input to `POST /train`: each gets a precise 4xx, leaves nothing behind and disturbs nothing.

Real processes throughout: uvicorn, a Celery worker and a Redis-compatible server (tests/service.py).
Bodies whose framing an HTTP client would not produce (chunked with no length, a lying
Content-Length, a body cut short or abandoned) go over a raw socket.

After each refused request: the status code and a message naming the field, line or limit; the
volume (datasets/ and datasets/.incoming/ included) byte-for-byte as before; `/status` and the job
list unchanged; no traceback in the API log. One test keeps a job training through the whole
battery and checks that it completes as if nothing had happened.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from tests.data import easy_records, jsonl
from tests.service import Service, flush, wait_running, wait_until

MB = 1 << 20
# A small service: 1 MB uploads, 64 KiB records, 1000 records, and two slots (its worker's, and one announced
# by a worker elsewhere: `_start`) so that hostile requests sent while a job trains reach the validators
# instead of the 409 for a full house.
LIMITS = {"LORA_MAX_UPLOAD_MB": "1", "LORA_MAX_RECORD_KB": "64", "LORA_MAX_RECORDS": "1000"}
BOUNDARY = b"hostile-7d3f9a"
MULTIPART = "multipart/form-data; boundary=" + BOUNDARY.decode()
GOOD = jsonl(easy_records(2))
LIMIT_MSG = "exceeds the 1 MB limit (LORA_MAX_UPLOAD_MB)"


# --- the services ---------------------------------------------------------------------------------


def _on_db(url: str, db: int) -> str:
    """The same Redis server, another database: a service of our own that no other fixture flushes."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{db}"))


def _start(root: Path, redis_url: str, env: dict[str, str]) -> Service:
    flush(redis_url)
    svc = Service(base_path=root / "base", redis_url=redis_url, log_dir=root / "logs", env_extra=env)
    svc.start()
    svc.slot_elsewhere()
    return svc


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory, redis_url: str, tiny_model_dir: Path) -> Iterator[Service]:
    svc = _start(tmp_path_factory.mktemp("limited"), _on_db(redis_url, 5), LIMITS)
    try:
        yield svc
    finally:
        svc.stop()


@pytest.fixture
def full_disk(tmp_path: Path, redis_url: str) -> Iterator[Service]:
    """The service on a 4 MiB tmpfs: a volume that really fills up (ENOSPC from the kernel, not a mock)."""
    base = tmp_path / "disk" / "base"
    base.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(base)], capture_output=True)
    if mounted.returncode != 0:
        pytest.fail(f"mounting a 4 MiB tmpfs needs root (CI runs as root): {mounted.stderr.decode().strip()}")
    svc: Service | None = None
    try:
        svc = _start(tmp_path / "disk", _on_db(redis_url, 6), {})
        yield svc
    finally:
        if svc is not None:
            svc.stop()
        subprocess.run(["umount", "-l", str(base)], check=False)


# --- what a request may not change ----------------------------------------------------------------


_OWN_DIRS = {"datasets", "datasets/.incoming"}  # created by the first upload, kept for the next


def _tree(root: Path) -> dict[str, int]:
    """Every file, link and folder under `root` (links not followed), with file sizes."""
    tree: dict[str, int] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if rel in _OWN_DIRS:
            continue
        tree[rel] = -1 if path.is_dir() and not path.is_symlink() else path.lstat().st_size
    return tree


def _tracebacks(svc: Service) -> int:
    log = svc.log_dir / "api.log"
    return log.read_text(errors="replace").count("Traceback") if log.exists() else 0


def _job_ids(svc: Service) -> list[str]:
    return [job["id"] for job in svc.get("/jobs", params={"limit": 100}).json()["data"]]


@dataclass
class State:
    files: dict[str, int]
    status: dict[str, Any]
    jobs: list[str]
    tracebacks: int


def _state(svc: Service, *, files_under: Path | None = None) -> State:
    root = files_under or svc.base_path
    return State(_tree(root), svc.get("/status").json(), _job_ids(svc), _tracebacks(svc))


def _settle(svc: Service) -> None:
    """Wait until the incoming folder is empty: an abandoned upload is removed once the server notices."""
    incoming = svc.base_path / "datasets" / ".incoming"
    wait_until(
        lambda: not (incoming.exists() and any(incoming.iterdir())),
        timeout=10,
        every=0.05,
        what=lambda: f"the incoming folder to empty: {sorted(p.name for p in incoming.iterdir())}",
    )


# --- sending --------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int | None  # None: the connection closed without an answer
    text: str


def _part(name: str, data: bytes, filename: bytes | None = None, headers: bytes = b"") -> bytes:
    disposition = b'Content-Disposition: form-data; name="' + name.encode() + b'"'
    if filename is not None:
        disposition += b'; filename="' + filename + b'"'
    return disposition + b"\r\n" + headers + b"\r\n" + data


def _multipart(*parts: bytes, boundary: bytes = BOUNDARY, close: bool = True) -> bytes:
    body = b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts)
    return body + (b"--" + boundary + b"--\r\n" if close else b"")


def _file(data: bytes = GOOD, filename: bytes = b"d.jsonl") -> bytes:
    return _part("file", data, filename)


def _config(config: str | bytes | dict[str, Any]) -> bytes:
    text = json.dumps(config) if isinstance(config, dict) else config
    return _part("config", text if isinstance(text, bytes) else text.encode())


def _post(svc: Service, body: bytes, content_type: str = MULTIPART) -> Reply:
    r = httpx.post(svc.url + "/train", content=body, headers={"content-type": content_type}, timeout=60)
    return Reply(r.status_code, r.text)


def _train(*parts: bytes) -> Callable[[Service], Reply]:
    return lambda svc: _post(svc, _multipart(*parts))


def _response_complete(buf: bytes) -> bool:
    head, sep, body = buf.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def _raw(svc: Service, headers: bytes, chunks: Iterable[bytes], *, half_close: bool = False) -> Reply:
    """One POST /train over a socket: `headers` (framing lines) then `chunks`, reading the answer meanwhile."""
    sock = socket.create_connection(("127.0.0.1", svc.port), timeout=30)
    received = bytearray()
    answered = threading.Event()

    def read() -> None:
        try:
            while not _response_complete(bytes(received)):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received.extend(chunk)
        except OSError:
            pass
        answered.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        sock.sendall(b"POST /train HTTP/1.1\r\nHost: test\r\nContent-Type: " + MULTIPART.encode() + b"\r\n" + headers)
        sock.sendall(b"\r\n")
        for chunk in chunks:
            if answered.is_set():
                break  # the server has answered: stop sending, as a client would
            sock.sendall(chunk)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the server may stop reading once it has answered
    answered.wait(30)
    sock.close()
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1]) if head.startswith(b"HTTP/1.1 ") else None
    return Reply(status, body.decode(errors="replace"))


def _chunked(pieces: Iterable[bytes]) -> Iterator[bytes]:
    for piece in pieces:
        yield b"%x\r\n%s\r\n" % (len(piece), piece)
    yield b"0\r\n\r\n"


def _slices(data: bytes, size: int = 1 << 16) -> Iterator[bytes]:
    return (data[i : i + size] for i in range(0, len(data), size))


def _over_limit_file() -> bytes:
    return _file(GOOD * (3 * MB // len(GOOD)))


def _chunked_over_limit(svc: Service) -> Reply:
    return _raw(svc, b"Transfer-Encoding: chunked\r\n", _chunked(_slices(_multipart(_over_limit_file()))))


def _declared_over_limit(svc: Service) -> Reply:
    """Content-Length says 10 GB: refused before a byte of the body is read."""
    return _raw(svc, b"Content-Length: 10000000000\r\n", [_file(GOOD * 100)])


def _length_fits_but_file_does_not(svc: Service) -> Reply:
    """Content-Length (1.9 MB) is under the request allowance; the file part in it is over 1 MB."""
    body = _multipart(_file(GOOD * (int(1.9 * MB) // len(GOOD))))
    return _raw(svc, b"Content-Length: %d\r\n" % len(body), _slices(body))


def _length_shorter_than_body(svc: Service) -> Reply:
    """Content-Length says 1000 while 3 MB follow: the body ends at 1000 bytes (inside the file part);
    the rest is not a request. Either answer is a 400, whichever of the app and uvicorn speaks first."""
    body = _multipart(_over_limit_file())
    return _raw(svc, b"Content-Length: 1000\r\n", _slices(body))


def _length_longer_than_body(svc: Service) -> Reply:
    """Content-Length promises 5000 bytes more than are sent, then the client stops sending."""
    body = _multipart(_file())
    return _raw(svc, b"Content-Length: %d\r\n" % (len(body) + 5000), [body], half_close=True)


def _abandoned_mid_file(svc: Service) -> Reply:
    """Half a file part, then the connection is dropped."""
    body = _multipart(_file(GOOD * 2000))
    return _raw(svc, b"Content-Length: %d\r\n" % len(body), [body[: len(body) // 2]], half_close=True)


@dataclass(frozen=True)
class Case:
    id: str
    send: Callable[[Service], Reply]
    status: int | tuple[int | None, ...]
    needles: tuple[str, ...]  # the message contains one of these


def case(id: str, send: Callable[[Service], Reply], status: int | tuple[int | None, ...], *needles: str) -> Case:
    assert needles and all(needles), f"{id}: name at least one non-empty text the message must contain"
    return Case(id, send, status, needles)


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _record(*messages: tuple[str, str]) -> bytes:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in messages]}).encode() + b"\n"


OK = (("user", "hi"), ("assistant", "hello"))

UPLOADS = [
    case("over-limit-with-content-length", _train(_over_limit_file()), 413, LIMIT_MSG),
    case("over-limit-chunked-no-content-length", _chunked_over_limit, 413, LIMIT_MSG),
    case("content-length-declares-10GB", _declared_over_limit, 413, LIMIT_MSG),
    case("content-length-fits-file-part-does-not", _length_fits_but_file_does_not, 413, LIMIT_MSG),
    case("content-length-shorter-than-body", _length_shorter_than_body, 400,
         "ended inside the 'file' part", "Invalid HTTP request"),
    case("content-length-longer-than-body-then-eof", _length_longer_than_body, (None, 400), "client disconnected"),
    case("connection-dropped-mid-file", _abandoned_mid_file, (None, 400), "client disconnected"),
]  # fmt: skip

PATHS = [
    case(f"{field}={value!r}", _train(_config({field: value}), _file()), 422, field)
    for field, value in [
        ("model_save_path", "../../etc"),
        ("model_save_path", "/etc/cron.d/evil"),
        ("model_save_path", "/abs"),
        ("model_save_path", "a/../../b"),
        ("model_save_path", "."),
        ("model_save_path", "link-out/x"),  # a symlink inside base_path pointing at /tmp
        ("model_save_path", "datasets"),
        ("model_save_path", "datasets/.incoming/x"),
        ("model_save_path", "checkpoints"),
        ("model_save_path", ".redis"),
        ("model_save_path", "a\x00b"),
        ("model_save_path", "x" * 300),
        ("model_save_path", "a/" * 2100),
        ("lora_path", "../../etc"),
        ("lora_path", "/etc"),
        ("lora_path", "/abs"),
        ("lora_path", "link-out"),
        ("lora_path", "no-adapter-here"),
    ]
]

MULTIPART_CASES = [
    case("not-multipart", lambda s: _post(s, GOOD, "application/json"), 415, "multipart/form-data"),
    case("multipart-without-boundary", lambda s: _post(s, _multipart(_file()), "multipart/form-data"), 400,
         "without a boundary"),
    case("boundary-mismatch", lambda s: _post(s, _multipart(_file(), boundary=b"other-boundary")), 400,
         "malformed multipart body"),
    case("boundary-300-chars", lambda s: _post(s, _multipart(_file(), boundary=b"b" * 300),
                                               "multipart/form-data; boundary=" + "b" * 300), 400, "boundary"),
    case("empty-body", lambda s: _post(s, b""), 400, "is empty"),
    case("garbage-body", lambda s: _post(s, bytes(range(256)) * 40), 400, "malformed multipart body"),
    case("truncated-inside-file", lambda s: _post(s, _multipart(_file(), close=False)[:-40]), 400,
         "ended inside the 'file' part"),
    case("truncated-before-closing-boundary",
         lambda s: _post(s, _multipart(_file(), close=False) + b"--" + BOUNDARY + b"\r\n"), 400, "closing boundary"),
    case("no-file-part", _train(_config({"epochs": 1})), 422, "missing the 'file' part"),
    case("no-parts-at-all", lambda s: _post(s, b"--" + BOUNDARY + b"--\r\n"), 422, "missing the 'file' part"),
    case("two-file-parts", _train(_file(), _file()), 422, "more than one 'file' part"),
    case("two-config-parts", _train(_config({}), _config({}), _file()), 422, "more than one 'config' part"),
    case("seventeen-parts", _train(*[_part(f"f{i}", b"x") for i in range(16)], _file()), 400, "more than 16 parts"),
    case("part-header-over-4kb", _train(_part("file", GOOD, b"d" * 5000)), 400, "malformed multipart body"),
    case("field-over-4kb", _train(_part("note", b"x" * 5000), _file()), 413, "'note' exceeds 4 KiB"),
]  # fmt: skip

CONFIGS = [
    case("config-not-json", _train(_config("epochs=3"), _file()), 422, "config is not valid JSON"),
    case("config-a-list", _train(_config("[1, 2]"), _file()), 422, "config must be a JSON object"),
    case("config-a-string", _train(_config('"epochs"'), _file()), 422, "config must be a JSON object"),
    case("config-null", _train(_config("null"), _file()), 422, "config must be a JSON object"),
    case("config-nested-30k", _train(_config(_nested(30_000)), _file()), 422, "nested too deeply"),
    case("config-nested-100k-arrays", _train(_config(_nested(100_000)), _file()), 413, "'config' exceeds 64 KiB"),
    case("config-huge", _train(_config({"model_name": "m" * 200_000}), _file()), 413, "'config' exceeds 64 KiB"),
    case("config-nan", _train(_config('{"learning_rate": NaN}'), _file()), 422, "NaN is not valid JSON"),
    case("config-infinity", _train(_config('{"learning_rate": Infinity}'), _file()), 422, "Infinity"),
    case("config-5000-digit-int", _train(_config('{"seed": ' + "9" * 5000 + "}"), _file()), 422, "4300 digits"),
    case("config-invalid-utf8", _train(_config(b'{"model_name": "\xff"}'), _file()), 422, "not valid UTF-8"),
    case("config-lone-surrogate", _train(_config('{"model_name": "\\ud800"}'), _file()), 422, "lone surrogate"),
    case("config-surrogate-key", _train(_config('{"\\udcff": 1}'), _file()), 422, "lone surrogate"),
    case("config-unknown-field", _train(_config({"epoch": 3}), _file()), 422, "epoch"),
    case("config-wrong-type", _train(_config({"epochs": "three"}), _file()), 422, "epochs"),
]  # fmt: skip

DATASETS = [
    case("dataset-invalid-utf8", _train(_file(GOOD + b'{"messages": "\xff\xfe"}\n')), 422,
         "line 3: invalid UTF-8 at byte 14"),
    case("dataset-invalid-utf8-in-array", _train(_file(b'[{"messages": "\xc3\x28"}]')), 422, "invalid UTF-8"),
    case("dataset-nan", _train(_file(b'{"messages": [{"role": "user", "content": NaN}]}\n')), 422,
         "line 1: not valid JSON (NaN is not valid JSON)"),
    case("dataset-infinity-in-array", _train(_file(b'[{"messages": -Infinity}]')), 422,
         "record 1 (line 1): not valid JSON (-Infinity is not valid JSON)"),
    case("dataset-line-over-record-limit", _train(_file(GOOD + _record(("user", "x" * 70_000), ("assistant", "y")))),
         422, "line 3: longer than the 64 KiB per-record limit"),
    case("dataset-record-over-limit-in-array",
         _train(_file(b"[" + _record(("user", "x" * 70_000), ("assistant", "y")) + b"]")), 422,
         "record 1 (line 1): longer than the 64 KiB per-record limit"),
    case("dataset-wrong-role", _train(_file(_record(("human", "hi"), ("assistant", "yo")))), 422,
         "line 1: messages[0].role 'human' is not one of system, developer, user, assistant, tool"),
    case("dataset-huge-role", _train(_file(_record(("r" * 60_000, "hi"), ("assistant", "yo")))), 422,
         "line 1: messages[0].role 'rrrr"),
    case("dataset-system-not-first", _train(_file(_record(("user", "a"), ("system", "b"), ("assistant", "c")))),
         422, "a system message may only come first"),
    case("dataset-turns-out-of-order", _train(_file(_record(("user", "a"), ("user", "b"), ("assistant", "c")))),
         422, "messages[1].role is 'user', expected 'assistant'"),
    case("dataset-empty-content", _train(_file(_record(("user", "   "), ("assistant", "yo")))), 422,
         "line 1: messages[0].content is empty"),
    case("dataset-content-not-string", _train(_file(b'{"messages": [{"role": "user", "content": 7}]}\n')),
         422, "messages[0].content must be a string"),
    case("dataset-no-assistant-turn", _train(_file(GOOD + _record(("user", "hi")))), 422,
         "line 3: the conversation must end with an assistant message"),
    case("dataset-lone-surrogate",
         _train(_file(b'{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "a"}]}')),
         422, "line 1: messages[0].content is not valid Unicode"),
    case("dataset-nested-20k-arrays", _train(_file(b'{"messages": ' + _nested(20_000).encode() + b"}\n")), 422,
         "line 1: not valid JSON (nested too deeply)"),
    case("dataset-nested-20k-in-array", _train(_file(b"[" + _nested(20_000).encode() + b"]")), 422,
         "record 1 (line 1): not valid JSON (nested too deeply)"),
    case("dataset-empty", _train(_file(b"")), 422, "line 1: the dataset is empty"),
    case("dataset-whitespace-only", _train(_file(b" \r\n\t\n")), 422, "the dataset is empty"),
    case("dataset-empty-array", _train(_file(b"[]")), 422, "the dataset holds no records"),
    case("dataset-binary", _train(_file(bytes(range(256)))), 422, "expected JSON Lines"),
    case("dataset-array-not-closed", _train(_file(b"[" + GOOD.splitlines()[0])), 422, "not closed with ']'"),
    case("dataset-data-after-array", _train(_file(b"[" + GOOD.splitlines()[0] + b"] {}")), 422,
         "unexpected data after the JSON array"),
    case("dataset-1001-records", _train(_file(jsonl(easy_records(1001)))), 422,
         "record 1001: more than the 1000 records allowed"),
    case("dataset-many-bad-lines", _train(_file(_record(("user", "hi")) * 500)), 422,
         "line 20: the conversation must end with an assistant message"),
    case("dataset-unknown-shape", _train(_file(b'{"x": 1}\n' * 500)), 422,
         "line 1: no known record shape: keys 'x'; accepted shapes: chat"),
]  # fmt: skip

CASES = UPLOADS + PATHS + MULTIPART_CASES + CONFIGS + DATASETS


def _check(reply: Reply, c: Case) -> None:
    statuses = c.status if isinstance(c.status, tuple) else (c.status,)
    assert reply.status in statuses, f"{c.id}: {reply.status} {reply.text[:500]}"
    if reply.status is not None:
        assert any(n in reply.text for n in c.needles), f"{c.id}: {reply.text[:500]}"
        assert len(reply.text) < 20_000, f"{c.id}: a {len(reply.text)}-character error message"


@pytest.fixture(scope="module")
def symlink_out(limited: Service) -> None:
    """A link inside the volume that leads out of it, for the path cases that try to use it."""
    link = limited.base_path / "link-out"
    if not link.is_symlink():
        link.symlink_to("/tmp")


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_hostile_request_is_a_precise_4xx_that_leaves_nothing(limited: Service, symlink_out: None, c: Case) -> None:
    before = _state(limited)
    reply = c.send(limited)
    _check(reply, c)
    _settle(limited)
    assert _state(limited) == before
    assert not Path("/abs").exists()


# --- inputs that must be accepted -----------------------------------------------------------------


ACCEPTED = [
    ("bom-crlf-jsonl", b"../../etc/passwd", b"\xef\xbb\xbf" + GOOD.replace(b"\n", b"\r\n")),
    ("crlf-json-array", b"/abs/evil.jsonl", json.dumps(easy_records(2), indent=1).replace("\n", "\r\n").encode()),
    ("bom-json-array", b"..", b"\xef\xbb\xbf" + json.dumps(easy_records(2)).encode()),
    ("nul-in-filename", b"x\x00/../../y", GOOD),
]


@pytest.mark.parametrize(("label", "filename", "data"), ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_client_filename_is_ignored_and_bom_and_crlf_are_accepted(
    limited: Service, tiny_model_dir: Path, label: str, filename: bytes, data: bytes
) -> None:
    passwd = Path("/etc/passwd").read_bytes()
    before = set(_tree(limited.base_path))
    config = {"model_name": str(tiny_model_dir), "epochs": 1, "model_save_path": f"accepted/{label}"}
    reply = _post(limited, _multipart(_config(config), _part("file", data, filename)))
    assert reply.status == 202, reply.text
    job_id = json.loads(reply.text)["job_id"]
    assert "2 records" in json.loads(reply.text)["message"]
    stored = limited.base_path / "datasets" / f"{job_id}.jsonl"
    assert [json.loads(line) for line in stored.read_text().splitlines()] == easy_records(2)
    job = limited.wait_for(job_id, {"succeeded", "failed", "cancelled"})
    assert job["status"] == "succeeded", job
    new = set(_tree(limited.base_path)) - before
    # Only our own names: the dataset under the job id, the adapter under model_save_path.
    assert {p.split("/")[0] for p in new} <= {"datasets", "accepted", "checkpoints"}, new
    assert {p for p in new if p.startswith("datasets/")} == {f"datasets/{job_id}.jsonl"}
    assert not any("passwd" in p or "evil" in p or p.endswith("/y") for p in new), new
    assert Path("/etc/passwd").read_bytes() == passwd
    assert not Path("/abs").exists()


# --- a job that is already running is not disturbed -----------------------------------------------


BATTERY_IDS = {"over-limit-chunked-no-content-length", "content-length-fits-file-part-does-not",
               "content-length-declares-10GB", "connection-dropped-mid-file", "model_save_path='../../etc'",
               "lora_path='/etc'", "model_save_path='.redis'", "boundary-mismatch", "truncated-inside-file",
               "two-file-parts", "config-nested-30k", "config-lone-surrogate", "dataset-invalid-utf8",
               "dataset-nested-20k-arrays", "dataset-line-over-record-limit", "dataset-no-assistant-turn",
               "dataset-lone-surrogate", "dataset-1001-records"}  # fmt: skip


def test_a_running_job_trains_on_undisturbed_through_the_battery(
    limited: Service, symlink_out: None, tiny_model_dir: Path
) -> None:
    """Rounds of hostile requests while a job trains (at least one whole round, at most three): each is
    refused precisely, and the job goes on to finish every step and save its adapter."""
    config = {"model_name": str(tiny_model_dir), "epochs": 100, "batch_size": 4, "model_save_path": "undisturbed"}
    reply = _post(limited, _multipart(_config(config), _file(jsonl(easy_records(8)))))
    assert reply.status == 202, reply.text
    job_id = json.loads(reply.text)["job_id"]
    wait_running(limited, job_id, min_step=1)
    datasets = limited.base_path / "datasets"
    battery = [c for c in CASES if c.id in BATTERY_IDS]
    assert len(battery) == len(BATTERY_IDS)
    rounds_while_running = 0
    for _ in range(3):
        for c in battery:
            before = _state(limited, files_under=datasets)
            _check(c.send(limited), c)
            _settle(limited)
            after = _state(limited, files_under=datasets)
            assert after.files == before.files and after.jobs == before.jobs, c.id
            assert after.tracebacks == before.tracebacks, limited.logs("api")
            assert after.status["job_id"] == job_id, (c.id, after.status)
            assert after.status["status"] in ("training", "completed"), (c.id, after.status)
            assert after.status["current_step"] >= before.status["current_step"]
        if limited.get(f"/jobs/{job_id}").json()["status"] != "running":
            break
        rounds_while_running += 1
    assert rounds_while_running >= 1, "the job ended before one round of hostile requests did"

    final = limited.wait_for(job_id, {"succeeded", "failed", "cancelled"}, timeout=180)
    assert final["status"] == "succeeded", final
    assert final["progress"]["current_step"] == final["progress"]["total_steps"] == 200
    assert final["attempts"] == 1
    assert (limited.base_path / "undisturbed" / "adapter_config.json").is_file()
    status = limited.get("/status").json()
    assert status["status"] == "completed" and status["job_id"] == job_id


# --- a volume that fills up -----------------------------------------------------------------------


def _dataset_of(size: int) -> bytes:
    """Valid JSON Lines of about `size` bytes, already in the normalised form (so the stored copy is as big)."""
    line = jsonl(easy_records(1))
    return line * (size // len(line) + 1)


def test_a_full_volume_is_a_507_with_no_partial_file(full_disk: Service, tiny_model_dir: Path) -> None:
    import os

    stat = os.statvfs(full_disk.base_path)
    free = stat.f_bavail * stat.f_frsize
    before = _state(full_disk)
    seen: dict[str, int] = {}
    # Sizes around the free space (the spooled upload fails) and around half of it (the upload fits,
    # its validated copy does not), stepping so the failure lands in write() and in the flush at close().
    sizes = [free + d for d in range(-12_000, 12_000, 1531)] + [free // 2 + d for d in range(1_000, 60_000, 7919)]
    for size in sizes:
        data = _dataset_of(size)[:size]
        data = data[: data.rfind(b"\n") + 1]
        reply = _post(full_disk, _multipart(_file(data)))
        assert reply.status == 507, f"{size}: {reply.status} {reply.text}"
        seen[json.loads(reply.text)["detail"]] = seen.get(json.loads(reply.text)["detail"], 0) + 1
        assert _state(full_disk) == before, size
    assert set(seen) == {
        "not enough disk space on the volume to store the upload",
        "not enough disk space on the volume to store the dataset",
    }, seen
    # The service is fine afterwards: a dataset that fits is accepted and stored.
    reply = _post(full_disk, _multipart(_config({"epochs": 1, "model_name": str(tiny_model_dir)}), _file()))
    assert reply.status == 202, reply.text
    job_id = json.loads(reply.text)["job_id"]
    assert (full_disk.base_path / "datasets" / f"{job_id}.jsonl").read_bytes() == GOOD
    assert full_disk.post(f"/jobs/{job_id}/cancel").status_code in (200, 202, 409)
    full_disk.wait_for(job_id, {"succeeded", "failed", "cancelled"})


# --- big uploads are streamed ---------------------------------------------------------------------


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


class Watch:
    """While a big upload streams: the API process's peak RSS, and `/status` answering meanwhile."""

    def __init__(self, svc: Service) -> None:
        assert svc.api is not None
        self.svc, self.pid = svc, svc.api.pid
        self.base = self.peak = _rss(self.pid)
        self.latencies: list[float] = []
        self.codes: set[int] = set()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._rss_loop), threading.Thread(target=self._status_loop)]

    def _rss_loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss(self.pid))
            time.sleep(0.005)

    def _status_loop(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            self.codes.add(self.svc.get("/status").status_code)
            self.latencies.append(time.monotonic() - t0)
            time.sleep(0.02)

    def __enter__(self) -> Watch:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    @property
    def growth(self) -> int:
        return self.peak - self.base


def _streamed(parts_before: bytes, data: bytes) -> Iterator[bytes]:
    """A multipart body whose file part is `data`, produced in 64 KiB pieces (httpx sends it chunked)."""
    yield parts_before + b"--" + BOUNDARY + b"\r\n" + _part("file", b"", b"big.jsonl")
    yield from _slices(data)
    yield b"\r\n--" + BOUNDARY + b"--\r\n"


def test_a_100k_record_dataset_streams_through_in_bounded_memory(service: Service, tiny_model_dir: Path) -> None:
    records = [
        {"messages": [{"role": "user", "content": f"question {i} " + "q" * 200},
                      {"role": "assistant", "content": f"answer {i} " + "a" * 200}]}
        for i in range(100_000)
    ]  # fmt: skip
    data = jsonl(records)
    assert len(data) > 45 * MB
    service.stop_worker()  # this is about the API: the job stays queued, so cancelling it is immediate
    service.slot_elsewhere()  # the slot admission counts: a worker elsewhere that has not taken the job yet
    config = b"--" + BOUNDARY + b"\r\n" + _config({"model_name": str(tiny_model_dir), "epochs": 1}) + b"\r\n"
    with Watch(service) as watch:
        r = httpx.post(service.url + "/train", content=_streamed(config, data), headers={"content-type": MULTIPART},
                       timeout=180)  # fmt: skip
    assert r.status_code == 202, r.text
    assert "100000 records" in r.json()["message"]
    job_id = r.json()["job_id"]
    stored = service.base_path / "datasets" / f"{job_id}.jsonl"
    assert stored.stat().st_size == len(data)
    assert watch.growth < len(data) // 5, (
        f"API RSS grew {watch.growth / MB:.1f} MB for a {len(data) / MB:.0f} MB upload"
    )
    assert watch.codes == {200} and max(watch.latencies) < 2.0, (watch.codes, max(watch.latencies))
    assert not list((service.base_path / "datasets" / ".incoming").iterdir())
    assert service.post(f"/jobs/{job_id}/cancel").json()["status"] == "cancelled"


@pytest.mark.parametrize("layout", ["jsonl", "json-array"])
def test_a_50mb_single_line_is_refused_at_the_record_limit_without_being_read_whole(
    service: Service, layout: str
) -> None:
    line = _record(("user", "x" * (50 * MB)), ("assistant", "y"))
    data = line if layout == "jsonl" else b"[" + line.strip() + b"]"
    before = _state(service)
    with Watch(service) as watch:
        r = httpx.post(service.url + "/train", content=_streamed(b"", data), headers={"content-type": MULTIPART},
                       timeout=180)  # fmt: skip
    assert r.status_code == 422, r.text
    where = "line 1" if layout == "jsonl" else "record 1 (line 1)"
    assert r.json()["errors"] == [{"loc": ["file", where], "msg": "longer than the 8 MiB per-record limit"}]
    assert watch.growth < 30 * MB, f"API RSS grew {watch.growth / MB:.1f} MB for a 50 MB line"
    assert _state(service) == before


@pytest.mark.parametrize("layout", ["jsonl", "json-array"])
def test_100k_nested_arrays_in_a_dataset_are_a_422_not_a_crash(service: Service, layout: str) -> None:
    """Under the default 8 MiB record limit the nesting itself is what gets refused."""
    nested = _nested(100_000).encode()
    data = b'{"messages": ' + nested + b"}\n" if layout == "jsonl" else b"[" + nested + b"]"
    before = _state(service)
    r = _post(service, _multipart(_file(data)))
    assert r.status == 422, r.text
    assert "not valid JSON (nested too deeply)" in r.text
    assert _state(service) == before
