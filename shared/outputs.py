"""Which folders the service may replace: empty ones and the outputs it wrote itself, never a user's.

Every adapter, merged model and checkpoint the service writes carries `OUTPUT_MARKER`, a small JSON
file naming what wrote it. A destination that exists and is neither empty nor marked (a base model
kept under the base path, a folder of the user's own files, a project directory) is refused before
a job starts, and again at the moment of writing, so nothing the user owns is ever deleted.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from shared.metrics import TrainingSummary
from shared.volume import TRAINING_SUMMARY

if TYPE_CHECKING:
    from shared.object_store import ObjectStore

OUTPUT_MARKER = ".lora-server-output.json"
OutputKind = Literal["adapter", "merged_model", "checkpoint"]


class DestinationInUse(FileExistsError):
    """The destination holds something the service did not write; it will not be replaced."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}; refusing to replace it (choose another path, or empty it first)")
        self.path, self.reason = path, reason


def destination_problem(path: Path) -> str | None:
    """Why `path` may not be (re)written by the service, or None when it may."""
    if path.is_symlink():
        return "is a symbolic link"
    if not path.exists():
        return None
    if not path.is_dir():
        return "is a file, not a folder"
    if (path / OUTPUT_MARKER).is_file():
        return None
    if next(path.iterdir(), None) is None:
        return None
    return "holds files this service did not write"


def stored_destination_problem(store: ObjectStore, path: Path) -> str | None:
    """`destination_problem`'s rule for the keys under `path`'s folder in the object store."""
    names = store.list_tree(path)
    if not names or OUTPUT_MARKER in names:  # an output of ours (complete, or an upload a failed run left)
        return None
    return "holds objects in the object store that this service did not write"


def check_destination(path: Path) -> None:
    """Raise `DestinationInUse` unless `path` may be written."""
    reason = destination_problem(path)
    if reason is not None:
        raise DestinationInUse(path, reason)


def write_marker(folder: Path, kind: OutputKind, **details: str | int | float | None) -> None:
    """Mark `folder` as an output of this service (written into the staged folder before the swap)."""
    (folder / OUTPUT_MARKER).write_text(json.dumps({"written_by": "lora-server", "kind": kind,
                                                    "written_at": time.time(), **details}))  # fmt: skip


def output_marker(folder: Path) -> dict[str, object] | None:
    """The marker of an output of this service in `folder`, or None (no marker, or not readable)."""
    try:
        marker = json.loads((folder / OUTPUT_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("written_by") == "lora-server" else None


def is_jobs_adapter(folder: Path, job_id: str) -> bool:
    """`folder` holds the complete adapter job `job_id` saved: the marker goes in last, with the job's id,
    and the folder is swapped into place whole, so a marked folder is never half-written."""
    marker = output_marker(folder)
    return marker is not None and marker.get("kind") == "adapter" and marker.get("job") == job_id


def adapter_summary(folder: Path) -> TrainingSummary | None:
    """The training summary saved with an adapter, or None when it is missing or unreadable."""
    try:
        return TrainingSummary.model_validate_json((folder / TRAINING_SUMMARY).read_text())
    except (OSError, ValueError):
        return None
