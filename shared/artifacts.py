"""What a job leaves on the volume: its adapter folder and its checkpoints, listed and archived safely.

Checkpoint layout (the worker writes it, the API reads it):

    <base_path>/checkpoints/<job_id>/step-000120/   adapter files, then `checkpoint.json` last
    checkpoint.json = {"step": int, "epoch": int, "loss": float | null, "created_at": float,
                       "eval_loss": float | null (optional)}

A folder whose name is not `step-N` (the worker's hidden staging folder) or that has no valid
`checkpoint.json` yet is not listed.
Nothing here follows a symlink or returns a path outside `base_path`.
"""

from __future__ import annotations

import os
import re
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.jobs import JobStatus

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_META = "checkpoint.json"
_CHECKPOINT_NAME = re.compile(r"^step-(\d{1,12})$")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_BLOCK = tarfile.BLOCKSIZE  # 512
_RECORD = tarfile.RECORDSIZE  # 20 blocks


class FileEntry(BaseModel):
    path: str = Field(description="POSIX path relative to the folder listed")
    size: int = Field(ge=0, description="bytes")


class CheckpointMeta(BaseModel):
    """The content of `checkpoint.json`."""

    model_config = ConfigDict(extra="ignore")

    step: int = Field(ge=0)
    epoch: int = Field(ge=0)
    loss: float | None = None
    eval_loss: float | None = None  # on the validation split, when the job has one
    created_at: float


class Checkpoint(BaseModel):
    name: str  # the folder name, "step-000120"
    step: int
    epoch: int
    loss: float | None
    eval_loss: float | None
    created_at: float
    path: str  # absolute folder on the volume
    files: list[FileEntry]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


# What the API answers about a job's files (here, so that clients need no web framework).


class CheckpointPublic(BaseModel):
    name: str
    step: int
    epoch: int
    loss: float | None
    eval_loss: float | None
    created_at: float
    files: list[FileEntry]
    total_bytes: int
    archive_url: str

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, base_url: str, job_id: str) -> CheckpointPublic:
        return cls(
            **checkpoint.model_dump(exclude={"path"}),
            total_bytes=checkpoint.total_bytes,
            archive_url=f"{base_url}/jobs/{job_id}/artifacts/archive?checkpoint={checkpoint.step}",
        )


class CheckpointPage(BaseModel):
    job_id: str
    data: list[CheckpointPublic]


class ArtifactsPublic(BaseModel):
    job_id: str
    status: JobStatus
    model_path: str | None  # the adapter folder, once the job succeeded
    files: list[FileEntry]  # relative to model_path
    total_bytes: int
    archive_url: str | None
    checkpoints: list[CheckpointPublic]


def _inside(base: Path, path: Path) -> Path | None:
    """`path` resolved, when it lies strictly inside `base`; None otherwise."""
    root = base.resolve()
    target = path.resolve()
    return target if target != root and root in target.parents else None


def checkpoints_root(base_path: Path, job_id: str) -> Path | None:
    """The job's checkpoint folder (it may not exist yet); None for an id that is not a plain name."""
    if not _SAFE_ID.match(job_id):
        return None
    return _inside(base_path, base_path / CHECKPOINTS_DIR / job_id)


def checkpoint_dir(base_path: Path, job_id: str, step: int) -> Path:
    """Where the worker writes the checkpoint taken after `step`."""
    root = checkpoints_root(base_path, job_id)
    if root is None:
        raise ValueError(f"{job_id!r} is not a job id")
    return root / f"step-{step:06d}"


def adapter_dir(base_path: Path, model_path: str | None) -> Path | None:
    """A job's adapter folder when it exists inside `base_path`, else None."""
    if not model_path:
        return None
    target = _inside(base_path, Path(model_path))
    return target if target is not None and target.is_dir() else None


def list_files(folder: Path) -> list[FileEntry]:
    """Regular files under `folder`, sorted; symlinks (files or folders) are neither listed nor followed."""
    entries: list[FileEntry] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not (here / d).is_symlink())
        for name in filenames:
            path = here / name
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            if path.is_symlink() or not path.is_file():
                continue
            entries.append(FileEntry(path=path.relative_to(folder).as_posix(), size=st.st_size))
    return sorted(entries, key=lambda e: e.path)


def _read_checkpoint(folder: Path) -> Checkpoint | None:
    match = _CHECKPOINT_NAME.match(folder.name)
    if match is None or folder.is_symlink() or not folder.is_dir():
        return None
    try:
        meta = CheckpointMeta.model_validate_json((folder / CHECKPOINT_META).read_bytes())
    except (OSError, ValidationError):
        return None  # still being written, or not ours
    return Checkpoint(
        name=folder.name,
        step=meta.step,
        epoch=meta.epoch,
        loss=meta.loss,
        eval_loss=meta.eval_loss,
        created_at=meta.created_at,
        path=str(folder),
        files=list_files(folder),
    )


def list_checkpoints(base_path: Path, job_id: str) -> list[Checkpoint]:
    """The job's complete checkpoints, oldest step first; [] when it has none."""
    root = checkpoints_root(base_path, job_id)
    if root is None or not root.is_dir():
        return []
    found = (_read_checkpoint(child) for child in root.iterdir())
    return sorted((c for c in found if c is not None), key=lambda c: c.step)


def get_checkpoint(base_path: Path, job_id: str, step: int) -> Checkpoint | None:
    return next((c for c in list_checkpoints(base_path, job_id) if c.step == step), None)


def iter_tar_gz(folder: Path, files: list[FileEntry], *, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """A gzip-compressed tar of `files` (relative to `folder`), produced chunk by chunk.

    Memory stays bounded by `chunk_size` whatever the folder's size. Members are the relative
    paths, so unpacking puts the files straight into the target folder. A file that vanished
    since listing is skipped; one that shrank is padded with zeros so the archive stays valid.
    """
    gz = zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: gzip framing
    written = 0

    def put(data: bytes) -> bytes:
        nonlocal written
        written += len(data)
        return gz.compress(data)

    for entry in files:
        name = PurePosixPath(entry.path)
        if name.is_absolute() or ".." in name.parts:
            continue
        try:
            fd = os.open(folder / entry.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            info = tarfile.TarInfo(entry.path)
            info.size, info.mtime, info.mode = st.st_size, int(st.st_mtime), 0o644
            if out := put(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")):
                yield out
            remaining = st.st_size
            while remaining > 0:
                data = fh.read(min(chunk_size, remaining))
                if not data:
                    break
                remaining -= len(data)
                if out := put(data):
                    yield out
        while remaining > 0:
            pad = min(chunk_size, remaining)
            remaining -= pad
            if out := put(b"\0" * pad):
                yield out
        if out := put(b"\0" * (-st.st_size % _BLOCK)):
            yield out
    end = 2 * _BLOCK
    end += -(written + end) % _RECORD
    yield put(b"\0" * end) + gz.flush()
