"""OpenAI-compatible files: `/v1/files` (upload, list, read, delete, content).

Two purposes share the surface: training data uploaded here (`fine-tune`), and each training job's
result file (`fine-tune-results`, its `step_metrics.csv`), which the worker writes and registers
when the job ends (worker.training.results_log) and which is listed on the job's `result_files`. Deleting a
result file removes its CSV and its record, so the job no longer lists it and reading it is a 404.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from pathlib import Path
from typing import Annotated, Final, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.datasets import check_disk, store_dataset
from api.deps import SettingsDep
from api.errors import FileNotFound, InvalidInput, MalformedRequest, ObjectStoreDown, field_error
from api.openai.convert import file_public
from api.openai.errors import OpenAIRoute
from api.openai.records import FileRecord
from api.openai.schemas import FileDeletedPublic, FilePublic, ListPage
from api.openai.store import OpenAIStore, OpenAIStoreDep, UnknownCursorError
from api.openai.uploads import receive_file_upload
from api.uploads import multipart_openapi
from shared.files import RESULTS_PURPOSE, UPLOAD_PURPOSE
from shared.object_store import OutsideStore, StorageUnavailable
from shared.settings import Settings

router = APIRouter(prefix="/v1/files", tags=["openai"], route_class=OpenAIRoute)

PURPOSE: Final = UPLOAD_PURPOSE  # the one purpose a client uploads

_BODY = multipart_openapi(
    ["file", "purpose"],
    {
        "file": {"type": "string", "format": "binary", "description": "chat or preference (DPO) dataset (JSONL)"},
        "purpose": {"type": "string", "enum": [PURPOSE]},
    },
)


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex[:24]}"


def get_file_record(store: OpenAIStore, file_id: str) -> FileRecord:
    record = store.get_file(file_id)
    if record is None:
        raise FileNotFound(file_id)
    return record


@router.post("", openapi_extra=_BODY, responses={400: {}, 413: {}, 415: {}, 507: {}})
async def create_file(request: Request, settings: SettingsDep, store: OpenAIStoreDep) -> FilePublic:
    """Upload a dataset (`purpose=fine-tune`): chat records, or preference pairs for DPO; it is validated and
    stored normalised as JSON Lines, its kind recorded."""
    await run_in_threadpool(check_disk, settings)
    upload = await receive_file_upload(request, settings)
    try:
        purpose = upload.fields.get("purpose")
        if purpose != PURPOSE:
            got = "missing" if purpose is None else f"{purpose!r}"
            msg = f"only {PURPOSE!r} is accepted"
            raise InvalidInput(f"purpose is {got}: {msg}", problems=[field_error(["purpose"], msg)])
        file_id = new_file_id()
        path, summary = await run_in_threadpool(store_dataset, upload.dataset, settings, file_id)
    finally:
        upload.discard()
    await run_in_threadpool(_push, settings, path)
    record = FileRecord(
        id=file_id,
        bytes=path.stat().st_size,
        created_at=int(time.time()),
        filename=upload.filename,
        purpose=PURPOSE,
        path=str(path),
        num_records=summary.num_records,
        kind=summary.kind,
    )
    try:
        await run_in_threadpool(store.add_file, record)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return file_public(record)


@router.get("")
def list_files(
    store: OpenAIStoreDep,
    after: Annotated[str | None, Query(description="id of the last file of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Annotated[Literal["asc", "desc"], Query(description="by upload time")] = "desc",
    purpose: Annotated[str | None, Query()] = None,
) -> ListPage[FilePublic]:
    try:
        records, has_more = store.list_files(after=after, limit=limit, order=order)
    except UnknownCursorError as exc:
        raise MalformedRequest(f"after: no file {after!r}", problems=[field_error(["after"], "no such file")]) from exc
    if purpose is not None:
        # Filtered after paging: a page may hold fewer than `limit`; `has_more` and `last_id` still walk on.
        records = [r for r in records if r.purpose == purpose]
    return ListPage.of([file_public(r) for r in records], has_more)


@router.get("/{file_id}", responses={404: {}})
def retrieve_file(file_id: str, store: OpenAIStoreDep) -> FilePublic:
    return file_public(get_file_record(store, file_id))


@router.delete("/{file_id}", responses={404: {}})
def delete_file(file_id: str, store: OpenAIStoreDep, settings: SettingsDep) -> FileDeletedPublic:
    """Forget the file and remove its content. Jobs created from it keep their own copy of the data;
    a job whose result file this was no longer lists it."""
    record = get_file_record(store, file_id)
    deleted = store.remove_file(file_id)
    Path(record.path).unlink(missing_ok=True)
    if settings.store is not None:
        with contextlib.suppress(StorageUnavailable, OutsideStore):  # a store that is down keeps an unlisted copy
            settings.store.delete_file(Path(record.path))
    return FileDeletedPublic(id=file_id, deleted=deleted)


@router.get("/{file_id}/content", response_class=FileResponse, responses={404: {}})
def file_content(file_id: str, store: OpenAIStoreDep, settings: SettingsDep) -> Response:
    """The stored content: normalised JSON Lines for training data, the CSV for a result file (with object
    storage, streamed from the store when this host has no copy)."""
    record = get_file_record(store, file_id)
    path = Path(record.path)
    csv = record.purpose == RESULTS_PURPOSE
    media, name = ("text/csv", record.filename) if csv else ("application/octet-stream", f"{file_id}.jsonl")
    if path.is_file():
        return FileResponse(path, media_type=media, filename=name)
    ostore = settings.store
    try:
        if ostore is not None and ostore.exists(path):
            if settings.storage_presign_s:  # the client fetches it from the store itself
                url = ostore.presign(path, expires_s=settings.storage_presign_s, filename=name)
                return RedirectResponse(url, status_code=307)
            disposition = {"Content-Disposition": f'attachment; filename="{name}"'}
            return StreamingResponse(ostore.stream(path), media_type=media, headers=disposition)
    except OutsideStore:
        pass
    except StorageUnavailable as exc:
        raise ObjectStoreDown(str(exc)) from exc
    raise FileNotFound(file_id, f"the content of {file_id} is no longer on the volume")


def _push(settings: Settings, path: Path) -> None:
    """With object storage the upload goes to the store too: a job's worker, or this API on a new host, finds it."""
    if settings.store is None:
        return
    try:
        settings.store.push_file(path)
    except StorageUnavailable as exc:
        path.unlink(missing_ok=True)
        raise ObjectStoreDown(str(exc)) from exc
