"""Leftovers in `datasets/.incoming`, removed by age: at API start and every `incoming_sweep_interval_s`.

A request removes its own staged files however it ends (the spooled `.upload`, the validated
`.jsonl.part`); only a process killed mid-request leaves one behind, and then nothing else ever would.
A staged file is live while it changes: the receiver marks all its request's files modified every
second while the body arrives (api.uploads) and gives up after `upload_idle_timeout_s` without data,
and validation writes its `.part` as it reads. So a file untouched for longer than
`effective_incoming_max_age_s` (ten minutes, never under twice that timeout) is nobody's, whichever
API process (of several on one volume) staged it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from starlette.concurrency import run_in_threadpool

from shared.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Swept:
    """What one sweep removed."""

    files: int = 0
    bytes: int = 0


def sweep_incoming(folder: Path, max_age_s: float, *, now: float | None = None) -> Swept:
    """Remove the plain files directly in `folder` last modified more than `max_age_s` ago."""
    now = time.time() if now is None else now
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:  # no upload yet on this volume
        return Swept()
    files = size = 0
    for entry in entries:
        try:
            info = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(info.st_mode) or now - info.st_mtime <= max_age_s:
                continue
            os.unlink(entry.path)
        except FileNotFoundError:  # its request ended (or another API process swept it) meanwhile
            continue
        files += 1
        size += info.st_size
    return Swept(files, size)


def sweep_and_report(settings: Settings) -> Swept:
    """One sweep of the volume's incoming folder, logged when it removed anything; an unreadable folder is logged."""
    max_age = settings.effective_incoming_max_age_s
    try:
        swept = sweep_incoming(settings.volume.incoming, max_age)
    except OSError as exc:
        log.warning("could not sweep %s: %s", settings.volume.incoming, exc)
        return Swept()
    if swept.files:
        log.warning(
            "removed %d stale upload file(s), %d bytes, from %s: untouched for over %g s (a request that never ended)",
            swept.files,
            swept.bytes,
            settings.volume.incoming,
            max_age,
        )
    return swept


async def sweep_periodically(settings: Settings) -> None:
    """Sweep every `incoming_sweep_interval_s`, for as long as the API runs (the start's sweep is the caller's)."""
    while True:
        await asyncio.sleep(settings.incoming_sweep_interval_s)
        await run_in_threadpool(sweep_and_report, settings)
