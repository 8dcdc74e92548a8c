"""Receiving `POST /v1/files` bodies: api.uploads' streaming receiver, keeping the form fields too.

The `file` part streams to our own name under the volume with the same size limit and cleanup as
`POST /train`; small fields (`purpose`) are kept as text; the client's filename is kept for
display only.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field

from fastapi import Request
from python_multipart.multipart import parse_options_header

from api.errors import InvalidInput, field_error
from api.uploads import Receiver, Upload, stream_multipart
from shared.settings import Settings


@dataclass
class FileUpload(Upload):
    fields: dict[str, str] = field(default_factory=dict)
    filename: str = ""


def display_name(raw: str) -> str:
    """A client filename fit for showing: its last path component, no control characters, bounded."""
    name = raw.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if unicodedata.category(c)[0] != "C").strip()
    return name[:255] or "upload.jsonl"


class _FieldsReceiver(Receiver):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, file_parts=("file",))
        self.fields: dict[str, str] = {}
        self.filename = ""

    def on_headers_finished(self) -> None:
        super().on_headers_finished()
        if self.part.is_file:
            _, options = parse_options_header(self.part.headers.get("content-disposition", ""))
            self.filename = display_name(options.get(b"filename", b"").decode("utf-8", "replace"))

    def on_part_end(self) -> None:
        if not self.part.is_file:
            self.fields[self.part.name] = self.part.buffer.decode("utf-8", "replace")
        super().on_part_end()


async def receive_file_upload(request: Request, settings: Settings) -> FileUpload:
    """Stream a multipart body with a `file` part; raise a ServiceError (and leave no file) when unusable."""
    receiver = _FieldsReceiver(settings)
    await stream_multipart(request, settings, receiver, expects="a 'file' part and a 'purpose' field")
    if receiver.dataset is None:
        raise InvalidInput("missing the 'file' part", problems=[field_error(["file"], "field required")])
    return FileUpload(
        config_text=None,
        dataset=receiver.dataset,
        fields=receiver.fields,
        filename=receiver.filename or "upload.jsonl",
    )
