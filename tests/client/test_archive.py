"""Unpacking a downloaded archive: nothing lands outside the target folder, no link is followed."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from client import UnsafeArchiveError, extract_tar_safely


def _tar(*members: tuple[tarfile.TarInfo, bytes]) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, payload in members:
            info.size = len(payload) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(payload) if info.isfile() else None)
    buf.seek(0)
    return buf


@pytest.mark.parametrize(
    "member",
    [tarfile.TarInfo("../escape.txt"), tarfile.TarInfo("/tmp/abs.txt"), tarfile.TarInfo("a/../../escape.txt")],
)
def test_download_refuses_members_that_leave_the_folder(tmp_path: Path, member: tarfile.TarInfo) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UnsafeArchiveError):
        extract_tar_safely(_tar((member, b"x")), dest)
    assert not (tmp_path / "escape.txt").exists() and not list(dest.rglob("*.txt"))


def test_download_refuses_links_and_does_not_follow_existing_ones(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    link = tarfile.TarInfo("evil")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc"
    with pytest.raises(UnsafeArchiveError):
        extract_tar_safely(_tar((link, b"")), dest)
    assert not (dest / "evil").exists()

    outside = tmp_path / "outside"
    outside.mkdir()
    (dest / "sub").symlink_to(outside)  # a link planted in the target folder beforehand
    with pytest.raises(UnsafeArchiveError):
        extract_tar_safely(_tar((tarfile.TarInfo("sub/file.txt"), b"x")), dest)
    assert not list(outside.iterdir())

    (outside / "target.txt").write_text("keep")
    (dest / "adapter_config.json").symlink_to(outside / "target.txt")
    written = extract_tar_safely(_tar((tarfile.TarInfo("adapter_config.json"), b"{}")), dest)
    assert written == [dest.resolve() / "adapter_config.json"]
    assert (outside / "target.txt").read_text() == "keep"  # replaced the link, did not write through it
    assert not (dest / "adapter_config.json").is_symlink() and (dest / "adapter_config.json").read_text() == "{}"
