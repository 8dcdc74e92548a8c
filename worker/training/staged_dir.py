"""Writing a folder so that readers see the old one or the complete new one, never a half-written one,
and only ever replacing what this service wrote (`shared.outputs`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from shared.outputs import OutputKind, check_destination, write_marker


@contextlib.contextmanager
def staged_dir(dest: Path, kind: OutputKind, **details: str | int | float | None) -> Iterator[Path]:
    """Yield a hidden sibling folder to write into; on success it is marked as ours and replaces
    `dest` (swap, then delete the old one), on failure it is removed and `dest` is left as it was.

    Raises `DestinationInUse` (before anything is written, and again before the swap) when `dest`
    holds anything but an empty folder or an earlier output of this service.
    """
    check_destination(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        yield staging
        write_marker(staging, kind, **details)
        check_destination(dest)  # the user may have put something there while we trained
        if dest.exists():
            old = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.old"
            os.replace(dest, old)
            os.replace(staging, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
