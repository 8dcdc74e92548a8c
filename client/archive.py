"""Unpacking a downloaded adapter archive without letting it write outside the target folder."""

from __future__ import annotations

import os
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import IO


class UnsafeArchiveError(ValueError):
    """An archive member would land outside the target folder, or is not a plain file or folder."""


def extract_tar_safely(fileobj: IO[bytes], dest: Path) -> list[Path]:
    """Unpack a tar(.gz) into `dest`: plain files and folders only, every path strictly inside `dest`.

    Links, devices, absolute names and `..` are refused before anything of that member is
    written. Each file is written to a temporary name and renamed, so an existing symlink at the
    target is replaced, never followed.
    """
    root = dest.resolve()

    def inside(path: Path) -> bool:
        return path == root or root in path.parents

    written: list[Path] = []
    with tarfile.open(fileobj=fileobj, mode="r:*") as tar:
        for member in tar:
            name = PurePosixPath(member.name)
            if name.is_absolute() or ".." in name.parts or "\\" in member.name or not name.name:
                raise UnsafeArchiveError(f"archive member {member.name!r} would leave the target folder")
            if not (member.isdir() or member.isfile()):
                raise UnsafeArchiveError(f"archive member {member.name!r} is not a plain file or folder")
            # Existing links in the folders on the way are followed (and must stay inside);
            # a link at the final name is replaced, never written through.
            parent = (root / name.parent).resolve()
            if not inside(parent):
                raise UnsafeArchiveError(f"archive member {member.name!r} resolves outside {dest}")
            target = parent / name.name
            if member.isdir():
                if target.is_symlink():
                    raise UnsafeArchiveError(f"archive folder {member.name!r} is a link in {dest}")
                target.mkdir(parents=True, exist_ok=True)
                continue
            parent.mkdir(parents=True, exist_ok=True)
            if not inside(parent.resolve()):
                raise UnsafeArchiveError(f"archive member {member.name!r} resolves outside {dest}")
            source = tar.extractfile(member)
            assert source is not None
            fd, tmp = tempfile.mkstemp(dir=parent, prefix=".part-")
            try:
                with os.fdopen(fd, "wb") as out:
                    while chunk := source.read(1 << 20):
                        out.write(chunk)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            written.append(target)
    return written
