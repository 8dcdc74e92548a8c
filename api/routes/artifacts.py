"""A job's files: the adapter it produced, its checkpoints, and either as one streamed tar.gz."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from api.artifacts import (
    Checkpoint,
    adapter_dir,
    get_checkpoint,
    iter_stored_tar_gz,
    iter_tar_gz,
    list_checkpoints,
    list_files,
    stored_folder,
)
from api.deps import JobDep, SettingsDep
from api.errors import NotFound, WrongJobState
from shared.job_api import ArtifactsPublic, CheckpointPage, CheckpointPublic, FileEntry
from shared.jobs import JobRecord, JobStatus
from shared.object_store import OutsideStore
from shared.settings import Settings

router = APIRouter(prefix="/jobs", tags=["artifacts"])

_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "no such job (or checkpoint)"}}


def _adapter(record: JobRecord, base_path: Path) -> Path | None:
    return adapter_dir(base_path, record.model_path) if record.status is JobStatus.succeeded else None


def _stored_adapter(record: JobRecord, settings: Settings) -> tuple[Path, list[FileEntry]] | None:
    """With object storage: the succeeded job's adapter folder (as named on this host) and its files."""
    store = settings.store
    if store is None or record.status is not JobStatus.succeeded or not record.model_path:
        return None
    folder = settings.volume.localize(record.model_path, record.volume_base)
    try:
        files = stored_folder(store, folder)
    except OutsideStore:
        return None
    return (folder, files) if files is not None else None


def _signed(settings: Settings, folder: Path, files: list[FileEntry]) -> list[FileEntry]:
    """With LORA_STORAGE_PRESIGN_S: each file with a URL to it in the store, so a client fetches it from there."""
    store, seconds = settings.store, settings.storage_presign_s
    if store is None or seconds == 0:
        return files
    return [f.model_copy(update={"url": store.presign(folder / f.path, expires_s=seconds)}) for f in files]


def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def checkpoint_public(checkpoint: Checkpoint, base_url: str, job_id: str) -> CheckpointPublic:
    """A checkpoint found on the volume, as the API shows it."""
    return CheckpointPublic(
        **checkpoint.model_dump(exclude={"path", "train_loss", "full_valid_loss"}),
        loss=checkpoint.train_loss,
        eval_loss=checkpoint.full_valid_loss,
        total_bytes=checkpoint.total_bytes,
        archive_url=f"{base_url}/jobs/{job_id}/artifacts/archive?checkpoint={checkpoint.step}",
    )


def _checkpoints(settings: Settings, job_id: str, request: Request) -> list[CheckpointPublic]:
    base_url = _base_url(request)
    return [
        checkpoint_public(c, base_url, job_id) for c in list_checkpoints(settings.volume, job_id, store=settings.store)
    ]


def _download_name(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")[:100]
    return f"{safe or 'adapter'}.tar.gz"


@router.get("/{job_id}/artifacts", responses=_NOT_FOUND)
def artifacts(record: JobDep, settings: SettingsDep, request: Request) -> ArtifactsPublic:
    """The adapter's files (once the job succeeded) with their sizes, and the job's checkpoints."""
    job_id = record.id
    stored = _stored_adapter(record, settings)
    if stored is not None:
        folder: Path | None = stored[0]
        files = _signed(settings, stored[0], stored[1])
    else:
        folder = _adapter(record, settings.base_path)
        files = list_files(folder) if folder is not None else []
    return ArtifactsPublic(
        job_id=job_id,
        status=record.status,
        model_path=str(folder) if folder is not None else None,
        files=files,
        total_bytes=sum(f.size for f in files),
        archive_url=f"{_base_url(request)}/jobs/{job_id}/artifacts/archive" if folder is not None else None,
        checkpoints=_checkpoints(settings, job_id, request),
    )


@router.get("/{job_id}/checkpoints", responses=_NOT_FOUND)
def checkpoints(record: JobDep, settings: SettingsDep, request: Request) -> CheckpointPage:
    """Checkpoints saved so far, oldest first (listed while the job still trains, too)."""
    return CheckpointPage(job_id=record.id, data=_checkpoints(settings, record.id, request))


@router.get(
    "/{job_id}/artifacts/archive",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/gzip": {}}, "description": "a tar.gz of the folder's files"},
        409: {"description": "the job has no adapter (it has not succeeded)"},
        **_NOT_FOUND,
    },
)
def archive(
    record: JobDep,
    settings: SettingsDep,
    checkpoint: Annotated[int | None, Query(ge=0, description="a checkpoint's step instead of the adapter")] = None,
) -> StreamingResponse:
    """The adapter folder (or one checkpoint) as a tar.gz, streamed; members are paths relative to it."""
    job_id = record.id
    if checkpoint is not None:
        found = get_checkpoint(settings.volume, job_id, checkpoint, store=settings.store)
        if found is None:
            raise NotFound(f"job {job_id!r} has no checkpoint at step {checkpoint}")
        folder, name = Path(found.path), f"{job_id}-{found.name}"
        if settings.store is not None:  # streamed from the store, object by object
            disposition = {"Content-Disposition": f'attachment; filename="{_download_name(name)}"'}
            body = iter_stored_tar_gz(settings.store, folder, found.files)
            return StreamingResponse(body, media_type="application/gzip", headers=disposition)
    else:
        if record.status is not JobStatus.succeeded:
            raise WrongJobState(f"job {job_id!r} has no adapter: it is {record.status.value}", record.status.value)
        stored = _stored_adapter(record, settings)
        if stored is not None and settings.store is not None:  # streamed from the store, object by object
            disposition = {"Content-Disposition": f'attachment; filename="{_download_name(stored[0].name)}"'}
            body = iter_stored_tar_gz(settings.store, stored[0], stored[1])
            return StreamingResponse(body, media_type="application/gzip", headers=disposition)
        adapter = _adapter(record, settings.base_path)
        if adapter is None:
            raise NotFound(f"the adapter folder of job {job_id!r} is no longer on the volume")
        folder, name = adapter, adapter.name
    headers = {"Content-Disposition": f'attachment; filename="{_download_name(name)}"'}
    return StreamingResponse(iter_tar_gz(folder, list_files(folder)), media_type="application/gzip", headers=headers)
