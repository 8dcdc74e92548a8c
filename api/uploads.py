"""Receiving `POST /train` bodies: multipart parsed as it streams, the file spooled to the volume.

Starlette's form parser puts no limit on file parts and spools them to the system temp dir; this
receiver counts bytes as they arrive (whatever Content-Length claims), stops at the configured
limit, writes only under base_path, never uses the client's filename, and removes its file on any
failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from api.errors import (
    InvalidInput,
    MalformedRequest,
    PayloadTooLarge,
    UnsupportedMediaType,
    UploadStalled,
    field_error,
    storage_failure,
)
from shared.settings import Settings

_OVERHEAD = 1 << 20  # room for the config part and multipart framing beyond the dataset limit
_MAX_PARTS = 16  # `POST /train` needs two; a cap keeps a body of tiny parts from piling up names
_FIELD_LIMIT = 4096  # bytes in a form field other than `config`
_TOUCH_EVERY_S = 1.0  # how often a receiving request marks its files live (well inside any sweep's age bound)


def _too_large(settings: Settings) -> PayloadTooLarge:
    return PayloadTooLarge(f"upload exceeds the {settings.max_upload_mb:g} MB limit (LORA_MAX_UPLOAD_MB)")


def multipart_openapi(required: list[str], properties: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The OpenAPI request body of a route that reads its multipart body itself (FastAPI cannot see its parts)."""
    schema = {"type": "object", "required": required, "properties": properties}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


@dataclass
class Upload:
    """What a `POST /train` body carried: the raw config text and the spooled dataset file."""

    config_text: str | None
    dataset: Path
    validation: Path | None = None  # an optional second dataset, held out for eval loss

    def discard(self) -> None:
        for path in (self.dataset, self.validation):
            if path is not None:
                path.unlink(missing_ok=True)


@dataclass
class _Part:
    name: str = ""
    is_file: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    buffer: bytearray = field(default_factory=bytearray)


class Receiver:
    """The parser's callbacks: route each part's bytes to memory (config) or to disk (file)."""

    def __init__(self, settings: Settings, file_parts: tuple[str, ...] = ("file", "validation_file")) -> None:
        self.settings = settings
        self.file_parts = file_parts  # parts spooled to disk; every other part is a small field
        self.config_limit = settings.max_config_kb * 1024
        self.part = _Part()
        self._field, self._value = b"", b""
        self.config_text: str | None = None
        self.dataset: Path | None = None
        self.validation: Path | None = None
        self.file_bytes = 0
        self.sink: IO[bytes] | None = None
        self.parts = 0
        self.complete = False  # the closing boundary was seen
        self._touched = time.monotonic()  # when keep_fresh last marked the files

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_end": self.on_end,
        }

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > _MAX_PARTS:
            raise MalformedRequest(f"the multipart body has more than {_MAX_PARTS} parts")
        self.part = _Part()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        name = self._field.decode("latin-1").lower()
        self.part.headers[name] = self._value.decode("latin-1")
        self._field, self._value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.part.headers.get("content-disposition", ""))
        self.part.name = options.get(b"name", b"").decode("utf-8", "replace")
        if self.part.name in self.file_parts:
            name = self.part.name
            if (self.dataset if name == "file" else self.validation) is not None:
                raise InvalidInput(
                    f"more than one {name!r} part", problems=[field_error([name], "send one dataset file")]
                )
            path = self.settings.volume.new_upload()
            if name == "file":
                self.dataset = path
            else:
                self.validation = path
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self.sink = path.open("xb")
            except OSError as exc:
                raise storage_failure(exc, "upload") from exc
            self.part.is_file = True

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self.part.is_file:
            assert self.sink is not None
            self.file_bytes += len(chunk)
            if self.file_bytes > self.settings.max_upload_bytes:
                raise _too_large(self.settings)
            try:
                self.sink.write(chunk)
            except OSError as exc:
                raise storage_failure(exc, "upload") from exc
            return
        self.part.buffer += chunk
        limit = self.config_limit if self.part.name == "config" else _FIELD_LIMIT
        if len(self.part.buffer) > limit:
            raise PayloadTooLarge(f"form field {self.part.name[:64]!r} exceeds {limit // 1024} KiB")

    def on_part_end(self) -> None:
        if self.part.is_file:
            assert self.sink is not None
            sink, self.sink = self.sink, None
            try:
                sink.close()  # flushes the last buffered bytes: the volume can fill up right here
            except OSError as exc:
                raise storage_failure(exc, "upload") from exc
        elif self.part.name == "config":
            if self.config_text is not None:
                raise InvalidInput("more than one 'config' part", problems=[field_error(["config"], "send one config")])
            try:
                self.config_text = self.part.buffer.decode("utf-8")
            except UnicodeDecodeError as exc:
                msg = f"not valid UTF-8 at byte {exc.start}"
                raise InvalidInput(f"config is {msg}", problems=[field_error(["config"], msg)]) from exc

    def on_end(self) -> None:
        self.complete = True

    def keep_fresh(self) -> None:
        """Mark this request's files modified now (at most every second) while its body arrives: a finished
        first part too, while a second one streams. A staged file untouched for long is a leftover (api.incoming)."""
        now = time.monotonic()
        if now - self._touched < _TOUCH_EVERY_S:
            return
        self._touched = now
        for path in (self.dataset, self.validation):
            if path is not None:
                try:
                    os.utime(path)
                except OSError as exc:
                    raise storage_failure(exc, "upload") from exc

    def close(self) -> None:
        """Release the open file on a failure path; the file is being discarded, so a failed flush is moot."""
        sink, self.sink = self.sink, None
        if sink is not None:
            with contextlib.suppress(OSError):
                sink.close()


async def stream_multipart(request: Request, settings: Settings, receiver: Receiver, *, expects: str) -> None:
    """Feed a multipart body to `receiver` as it arrives; raise a ServiceError (leaving no file) if it is unusable.

    Bytes are counted as they arrive, whatever Content-Length claims (and with chunked transfer
    encoding, when there is none); the body must end with its closing boundary.
    `expects` completes the 415 message: what the endpoint wants in its parts.
    """
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data":
        raise UnsupportedMediaType(f"send multipart/form-data with {expects}")
    boundary = params.get(b"boundary")
    if not boundary:
        raise MalformedRequest("multipart body without a boundary")
    declared = request.headers.get("content-length")
    limit = settings.max_upload_bytes + _OVERHEAD
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(settings)  # refuse before reading a byte
    try:
        parser = MultipartParser(boundary, receiver.callbacks())  # type: ignore[arg-type]
    except FormParserError as exc:
        raise MalformedRequest(f"unusable multipart boundary: {exc}") from exc
    received = 0
    try:
        chunks = request.stream().__aiter__()
        while True:
            try:
                # A client that stops sending must not hold a partial file (and a request) open forever.
                chunk = await asyncio.wait_for(chunks.__anext__(), settings.upload_idle_timeout_s)
            except StopAsyncIteration:
                break
            except TimeoutError as exc:
                raise UploadStalled(
                    f"no upload data for {settings.upload_idle_timeout_s:g} s; upload abandoned"
                ) from exc
            received += len(chunk)
            if received > limit:
                raise _too_large(settings)
            parser.write(chunk)
            receiver.keep_fresh()
        parser.finalize()
        if receiver.sink is not None:
            raise MalformedRequest("the multipart body ended inside the 'file' part")
        if not receiver.complete:
            what = "is empty" if received == 0 else "ended before its closing boundary"
            raise MalformedRequest(f"the multipart body {what}")
    except BaseException as exc:
        receiver.close()
        _remove(receiver.dataset)
        _remove(receiver.validation)
        if isinstance(exc, FormParserError):
            raise MalformedRequest(f"malformed multipart body: {exc}") from exc
        if isinstance(exc, ClientDisconnect):
            # Nobody is left to read an answer; this only keeps a dropped upload out of the error log.
            raise MalformedRequest("the client disconnected before the body was complete") from exc
        raise


async def receive_upload(request: Request, settings: Settings) -> Upload:
    """Stream a multipart body into an Upload; raise a ServiceError (and leave no file) when it is unusable."""
    receiver = Receiver(settings)
    await stream_multipart(
        request,
        settings,
        receiver,
        expects="a 'file' part (the dataset), an optional 'config' part and an optional 'validation_file' part",
    )
    if receiver.dataset is None:
        _remove(receiver.validation)
        raise InvalidInput("missing the 'file' part (the dataset)", problems=[field_error(["file"], "field required")])
    return Upload(receiver.config_text, receiver.dataset, receiver.validation)


def _remove(path: Path | None) -> None:
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
