"""The sweep of datasets/.incoming on a real folder: plain files past the age bound go, nothing else does."""

from __future__ import annotations

import os
import time
from pathlib import Path

from api.incoming import Swept, sweep_incoming

HOUR = 3600


def _plant(folder: Path, name: str, size: int, *, age: float) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(b"x" * size)
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def test_only_plain_files_untouched_past_the_bound_are_swept(tmp_path: Path) -> None:
    folder = tmp_path / ".incoming"
    assert sweep_incoming(folder, 60) == Swept()  # no folder yet
    old = _plant(folder, "old.upload", 7, age=HOUR)
    young = _plant(folder, "young.upload", 5, age=30)
    (folder / "sub").mkdir()
    os.utime(folder / "sub", (time.time() - HOUR,) * 2)
    (folder / "link").symlink_to(old)
    then = time.time() - HOUR
    os.utime(folder / "link", (then, then), follow_symlinks=False)
    assert sweep_incoming(folder, 60) == Swept(files=1, bytes=7)
    assert not old.exists() and young.exists() and (folder / "sub").is_dir() and (folder / "link").is_symlink()
