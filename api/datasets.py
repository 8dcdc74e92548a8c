"""Datasets onto the volume: an upload validated into place, stored files given a job's own names.

Whatever fails, nothing is left in the datasets folder under a final name.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from api.dataset_validation import DatasetError, DatasetSummary, validate_dataset
from api.errors import (
    InvalidDataset,
    ObjectStoreDown,
    UnknownFile,
    VolumeFull,
    WrongDataKind,
    field_error,
    storage_failure,
)
from shared.config import TrainingMethod
from shared.object_store import OutsideStore, StorageUnavailable
from shared.preference import kind_problem
from shared.settings import Settings


@dataclass(frozen=True)
class JobData:
    """What a job trains on, under its own names in the datasets folder."""

    dataset: Path
    validation: Path | None
    num_records: int

    def remove(self) -> None:
        for path in (self.dataset, self.validation):
            if path is not None:
                path.unlink(missing_ok=True)


def check_disk(settings: Settings) -> None:
    """Refuse an upload before reading it when the volume is nearly full (LORA_MIN_FREE_DISK_MB)."""
    settings.base_path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(settings.base_path).free
    if free < settings.min_free_disk_mb * 1024 * 1024:
        raise VolumeFull("upload (LORA_MIN_FREE_DISK_MB)")


def store_dataset(
    upload: Path, settings: Settings, name: str, *, part: str = "file", method: TrainingMethod | None = None
) -> tuple[Path, DatasetSummary]:
    """Validate the spooled upload and move its normalised form into place as dataset `name`.

    InvalidDataset names each bad line; InvalidInput (naming `part`) when `method` is given and cannot
    train on this kind of data; VolumeFull or StorageFailed when writing fails.
    """
    volume = settings.volume
    staging, final = volume.staging(name), volume.dataset(name)
    try:
        staging.parent.mkdir(parents=True, exist_ok=True)
        summary = validate_dataset(
            upload, staging, max_record_bytes=settings.max_record_kb * 1024, max_records=settings.max_records
        )
        problem = kind_problem(summary.kind, method) if method is not None else None
        if problem is not None:
            staging.unlink(missing_ok=True)
            raise WrongDataKind(f"{part}: {problem}", problems=[field_error([part], problem)])
        os.replace(staging, final)
    except DatasetError as exc:
        raise InvalidDataset(part, exc.problems, exc.truncated, str(exc)) from exc
    except OSError as exc:
        staging.unlink(missing_ok=True)
        raise storage_failure(exc, "dataset") from exc
    return final, summary


@dataclass(frozen=True)
class UploadedData:
    """Spooled uploads of a `POST /train`: validated into the job's dataset names, each of the kind of
    data `method` trains on."""

    dataset: Path
    validation: Path | None = None
    method: TrainingMethod = "sft"

    def place(self, settings: Settings, job_id: str) -> JobData:
        dataset, summary = store_dataset(self.dataset, settings, job_id, method=self.method)
        validation = None
        if self.validation is not None:
            try:
                validation, _ = store_dataset(
                    self.validation, settings, f"{job_id}.validation", part="validation_file", method=self.method
                )
            except BaseException:
                dataset.unlink(missing_ok=True)
                raise
        return JobData(dataset, validation, summary.num_records)


@dataclass(frozen=True)
class StoredData:
    """Datasets stored earlier (uploaded files): the job gets its own names for them, so deleting the
    file later leaves the job its data."""

    dataset: Path
    num_records: int
    validation: Path | None = None

    def place(self, settings: Settings, job_id: str) -> JobData:
        dataset, held_out = settings.volume.job_datasets(job_id)
        _stage_from_store(settings, self.dataset, self.validation)
        try:
            _link(self.dataset, dataset)
            if self.validation is not None:
                _link(self.validation, held_out)
        except FileNotFoundError as exc:
            dataset.unlink(missing_ok=True)
            msg = "it was deleted"
            raise UnknownFile(
                f"invalid training_file or validation_file: {msg}", problems=[field_error(["training_file"], msg)]
            ) from exc
        except OSError as exc:
            dataset.unlink(missing_ok=True)
            raise storage_failure(exc, "dataset") from exc
        return JobData(dataset, held_out if self.validation is not None else None, self.num_records)


def _stage_from_store(settings: Settings, *paths: Path | None) -> None:
    """Uploaded files this API host has no copy of (it was replaced, or another API took the upload), from the
    object store."""
    store = settings.store
    if store is None:
        return
    try:
        for path in paths:
            if path is not None and not path.exists():
                store.pull_file(path)
    except OutsideStore:
        return
    except StorageUnavailable as exc:
        raise ObjectStoreDown(str(exc)) from exc


def _link(src: Path, dest: Path) -> None:
    """A hard link; a copy where the filesystem cannot link."""
    try:
        os.link(src, dest)
    except FileNotFoundError:
        raise
    except OSError:
        shutil.copyfile(src, dest)
