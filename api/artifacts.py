"""Reading what a job left on the volume: its adapter folder and its checkpoints, listed and archived safely.

The layout is shared.volume's. A checkpoint folder whose name is not `step-N` (the worker's hidden
staging folder) or that has no valid `checkpoint.json` yet is not listed. Nothing here follows a
symlink or returns a path outside `base_path`.
"""

from __future__ import annotations

import os
import tarfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from pydantic import ValidationError

from shared.job_api import FileEntry
from shared.job_ids import is_job_id
from shared.object_store import MANIFEST, ObjectStore, StorageUnavailable
from shared.volume import CHECKPOINT_META, CheckpointMeta, Volume, checkpoint_step

_BLOCK = tarfile.BLOCKSIZE  # 512
_RECORD = tarfile.RECORDSIZE  # 20 blocks


class Checkpoint(CheckpointMeta):
    """A complete checkpoint found on the volume."""

    name: str  # the folder name, "step-000120"
    path: str  # absolute folder on the volume
    files: list[FileEntry]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def _inside(base: Path, path: Path) -> Path | None:
    """`path` resolved, when it lies strictly inside `base`; None otherwise."""
    root = base.resolve()
    target = path.resolve()
    return target if target != root and root in target.parents else None


def _checkpoints_root(volume: Volume, job_id: str) -> Path | None:
    """The job's checkpoint folder (it may not exist yet); None for an id that is not a job id."""
    if not is_job_id(job_id):
        return None
    return _inside(volume.base, volume.job_checkpoints(job_id))


def adapter_dir(base_path: Path, model_path: str | None, *, store: ObjectStore | None = None) -> Path | None:
    """A job's adapter folder when it exists inside `base_path` (with object storage: when the store holds it
    complete), else None."""
    if not model_path:
        return None
    target = _inside(base_path, Path(model_path))
    if target is None:
        return None
    if store is not None:
        return target if store.manifest(target) is not None else None
    return target if target.is_dir() else None


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
    if checkpoint_step(folder.name) is None or folder.is_symlink() or not folder.is_dir():
        return None
    try:
        meta = CheckpointMeta.model_validate_json((folder / CHECKPOINT_META).read_bytes())
    except (OSError, ValidationError):
        return None  # still being written, or not ours
    return Checkpoint(**meta.model_dump(), name=folder.name, path=str(folder), files=list_files(folder))


def list_checkpoints(volume: Volume, job_id: str, *, store: ObjectStore | None = None) -> list[Checkpoint]:
    """The job's complete checkpoints, oldest step first; [] when it has none. With object storage, those the
    store holds complete (the worker sends each one as it is written)."""
    root = _checkpoints_root(volume, job_id)
    if root is None:
        return []
    if store is not None:
        return _stored_checkpoints(store, root)
    if not root.is_dir():
        return []
    found = (_read_checkpoint(child) for child in root.iterdir())
    return sorted((c for c in found if c is not None), key=lambda c: c.step)


def get_checkpoint(volume: Volume, job_id: str, step: int, *, store: ObjectStore | None = None) -> Checkpoint | None:
    return next((c for c in list_checkpoints(volume, job_id, store=store) if c.step == step), None)


def _stored_checkpoints(store: ObjectStore, root: Path) -> list[Checkpoint]:
    names = store.list_tree(root)
    found = []
    for name in names:
        folder, _, leaf = name.partition("/")
        if leaf != MANIFEST or checkpoint_step(folder) is None:
            continue
        files = stored_folder(store, root / folder)
        if files is None:
            continue
        try:
            meta = CheckpointMeta.model_validate_json(b"".join(store.stream(root / folder / CHECKPOINT_META)))
        except (ValidationError, StorageUnavailable):
            continue
        found.append(Checkpoint(**meta.model_dump(), name=folder, path=str(root / folder), files=files))
    return sorted(found, key=lambda c: c.step)


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


# ----------------------------------------------------------------------------- in the object store


def stored_folder(store: ObjectStore, folder: Path) -> list[FileEntry] | None:
    """The files of the complete folder the store holds at `folder` (its manifest's), or None."""
    files = store.manifest(folder)
    if files is None:
        return None
    return [FileEntry(path=name, size=size) for name, size in sorted(files.items())]


def iter_stored_tar_gz(store: ObjectStore, folder: Path, files: list[FileEntry], *,
                       chunk_size: int = 1 << 20) -> Iterator[bytes]:  # fmt: skip
    """A gzip-compressed tar of a folder in the object store, each object read from the store as it is sent:
    memory stays bounded by `chunk_size`. Sizes are the manifest's (an object that came back shorter is padded,
    so the archive stays valid)."""
    gz = zlib.compressobj(6, zlib.DEFLATED, 31)
    written = 0
    mtime = int(time.time())

    def put(data: bytes) -> bytes:
        nonlocal written
        written += len(data)
        return gz.compress(data)

    for entry in files:
        name = PurePosixPath(entry.path)
        if name.is_absolute() or ".." in name.parts:
            continue
        info = tarfile.TarInfo(entry.path)
        info.size, info.mtime, info.mode = entry.size, mtime, 0o644
        if out := put(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")):
            yield out
        remaining = entry.size
        for data in store.stream(folder / entry.path, chunk_size=chunk_size):
            data = data[:remaining]
            remaining -= len(data)
            if out := put(data):
                yield out
        while remaining > 0:
            pad = min(chunk_size, remaining)
            remaining -= pad
            if out := put(b"\0" * pad):
                yield out
        if out := put(b"\0" * (-entry.size % _BLOCK)):
            yield out
    end = 2 * _BLOCK
    end += -(written + end) % _RECORD
    yield put(b"\0" * end) + gz.flush()
