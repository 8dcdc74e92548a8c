"""A job's files on a host that shares no disk with the API: staged from the object store before it runs,
sent back as they are written (`shared.object_store`). Without LORA_STORAGE_URL every function here is the
identity or does nothing: the base path is then the store.

What a training job reads is pulled into this host's base path under the same layout: its datasets, its base
model and the adapter it continues when those are folders under the base path (base models kept in the
store), and the newest complete state a run of the job saved (possibly on another host, now gone). What it
writes goes back: each saved state (older ones then removed), each checkpoint, and the adapter, whose upload
completes (manifest last) before the job may be recorded as succeeded.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from shared.jobs import JobRecord
from shared.object_store import MANIFEST, ObjectStore, OutsideStore, StorageUnavailable
from shared.outputs import DestinationInUse, stored_destination_problem
from shared.settings import Settings

log = logging.getLogger(__name__)

_STATE = re.compile(r"^(step-\d+)/" + re.escape(MANIFEST) + "$")


@dataclass(frozen=True)
class JobFiles:
    """A job's paths as they lie on this host."""

    dataset: Path
    validation: Path | None
    output: Path
    model: str  # the base model as the engine loads it: a folder, or a hub id
    adapter: Path | None  # the adapter a training job continues

    @classmethod
    def of(cls, record: JobRecord, settings: Settings) -> JobFiles:
        volume, origin = settings.volume, record.volume_base

        def local(path: str) -> Path:
            return volume.localize(path, origin)

        model = record.model_dir or record.config.model_name
        if model.startswith("/"):
            model = str(local(model))
        return cls(
            dataset=local(record.dataset_path),
            validation=local(record.validation_path) if record.validation_path else None,
            output=local(record.output_dir),
            model=model,
            adapter=local(record.adapter_dir) if record.adapter_dir else None,
        )


def _under_store(store: ObjectStore, path: Path) -> bool:
    try:
        store.rel(path)
    except OutsideStore:
        return False
    return True


def stage_training(files: JobFiles, settings: Settings, job_id: str) -> None:
    """Pull what a training (or merge) job reads into this host's base path. StorageUnavailable when the store
    cannot be read; FileNotFoundError naming what the store lacks."""
    store = settings.store
    if store is None:
        return
    for path in (files.dataset, files.validation):
        if path is not None and not path.exists() and not _pull(store, path):
            raise FileNotFoundError(f"{store.key(path)} is not in the object store {store.url}")
    for folder in (Path(files.model), files.adapter):
        if folder is not None:
            stage_folder(store, folder)
    pull_newest_state(store, settings.volume.job_state(job_id))


def stage_folder(store: ObjectStore, folder: Path) -> None:
    """A model or adapter folder under the base path, staged from the store unless this host has it already
    (keys are written once: a folder here is the folder there); one a user synced into the store without our
    manifest is taken as listed. FileNotFoundError when the store lacks it."""
    if not folder.is_absolute() or not _under_store(store, folder):
        return
    if not folder.is_dir() and not store.pull_tree(folder, listed_ok=True):
        raise FileNotFoundError(f"no complete folder {store.key(folder)}/ in the object store {store.url}")
    if store.manifest(folder) is not None or store.listed_folder(folder):
        mark_staged(folder)  # a copy of the store's: a cache entry, used now


def _pull(store: ObjectStore, path: Path) -> bool:
    """A file, or a folder (a merge job's input adapter is a folder)."""
    return store.pull_file(path) or store.pull_tree(path, listed_ok=True)


def pull_newest_state(store: ObjectStore, state_dir: Path) -> Path | None:
    """The newest complete saved state of the job in the store, staged into `state_dir` (another host saved it)."""
    names = [m.group(1) for name in store.list_tree(state_dir) if (m := _STATE.match(name))]
    if not names:
        return None
    newest = state_dir / max(names)
    if store.pull_tree(newest):
        log.info("staged the saved state %s from the object store", store.key(newest))
        return newest
    return None


def publisher(settings: Settings, job_id: str) -> Callable[[Path], None] | None:
    """What a run calls with each folder it completed: sent to the store; a state's older siblings removed."""
    store = settings.store
    if store is None:
        return None
    state_dir = settings.volume.job_state(job_id).resolve()
    checkpoints_dir = settings.volume.job_checkpoints(job_id).resolve()

    def publish(folder: Path) -> None:
        store.push_tree(folder)
        parent = folder.resolve().parent
        if parent == state_dir:  # only the newest state is kept
            older = {name.split("/", 1)[0] for name in store.list_tree(state_dir)} - {folder.name}
            for name in older:
                store.delete_tree(state_dir / name)
        elif parent == checkpoints_dir:  # the checkpoints the run pruned (keep_checkpoints) go from the store too
            stored = {name.split("/", 1)[0] for name in store.list_tree(checkpoints_dir) if "/" in name}
            for name in stored:
                if name.startswith("step-") and not (checkpoints_dir / name).exists():
                    store.delete_tree(checkpoints_dir / name)

    return publish


def push_output(settings: Settings, output: Path) -> None:
    """Send the job's finished folder (adapter, merged model) to the store, completely, before it is recorded.
    `DestinationInUse` when objects someone else put under its name since the submission was checked are there:
    the rule for the volume holds for keys, nothing of a user's is replaced."""
    store = settings.store
    if store is not None:
        problem = stored_destination_problem(store, output)
        if problem is not None:
            raise DestinationInUse(Path(store.key(output)), problem)
        store.push_tree(output)
        log.info("uploaded %s to the object store", store.key(output))


def stored_output(settings: Settings, output: Path) -> bool:
    """Pull the job's complete output folder when the store has it and this host does not (an earlier run on
    another host saved it, then lost its lease)."""
    store = settings.store
    if store is None or output.is_dir():
        return output.is_dir()
    return store.pull_tree(output)


def push_file_quietly(settings: Settings, path: Path) -> bool:
    """Send a file the job wrote (its result CSV) to the store; False when the store would not take it (the
    job's outcome matters more than its metrics file)."""
    store = settings.store
    if store is None or not path.is_file():
        return True
    try:
        store.push_file(path)
    except StorageUnavailable as exc:
        log.warning("could not send %s to the object store: %s", path.name, exc)
        return False
    return True


def api_name(settings: Settings, record: JobRecord, path: Path) -> str:
    """`path` (under this host's base path) as the API names it: under the base path its record was named under."""
    if record.volume_base is None:
        return str(path)
    try:
        return str(Path(record.volume_base) / path.resolve().relative_to(settings.base_path.resolve()))
    except ValueError:
        return str(path)


def drop_state(settings: Settings, job_id: str) -> None:
    """The job has ended: its saved states go from the store too."""
    store = settings.store
    if store is not None:
        store.delete_tree(PurePosixPath(settings.volume.job_state(job_id).resolve().relative_to(store.base).as_posix()))


# ----------------------------------------------------------------------------- the local copies kept

STAGED_MARK = ".lora-staged"  # in a folder staged from the store (this host's copy only; never uploaded)


def mark_staged(folder: Path) -> None:
    """A staged folder is a cache entry: its mark's time is its last use (LRU)."""
    if folder.is_dir():
        (folder / STAGED_MARK).touch()


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def evict_staged(base: Path, max_bytes: int) -> list[Path]:
    """Delete the least recently used staged folders under `base` until those left hold at most `max_bytes`;
    returns those deleted. A folder deleted while a model loaded from it is still in use is harmless: the
    store keeps it, and the next use stages it again."""
    entries = []
    for mark in base.rglob(STAGED_MARK):
        with contextlib.suppress(OSError):
            entries.append((mark.stat().st_mtime, mark.parent, _size(mark.parent)))
    total = sum(size for _, _, size in entries)
    deleted = []
    for _, folder, size in sorted(entries, key=lambda e: e[0]):
        if total <= max_bytes:
            break
        shutil.rmtree(folder, ignore_errors=True)
        total -= size
        deleted.append(folder)
        log.info("evicted the staged copy %s (%d MB) from this host's cache", folder, size >> 20)
    return deleted


def tidy(settings: Settings, files: JobFiles, job_id: str) -> None:
    """After a job ends on a host with object storage: its own files go from this host (the store has them),
    and the staged copies it used are kept within LORA_STORAGE_CACHE_GB."""
    if settings.store is None:
        return
    for path in (files.dataset, files.validation):
        if path is not None:
            path.unlink(missing_ok=True)
    for folder in (files.output, settings.volume.job_state(job_id), settings.volume.job_checkpoints(job_id)):
        shutil.rmtree(folder, ignore_errors=True)
    evict_staged(settings.base_path, int(settings.storage_cache_gb * 2**30))
