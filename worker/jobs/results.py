"""Registering a finished job's result file (`worker.training.results_log`) as an OpenAI file record."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import redis

from shared.files import RESULTS_PURPOSE, FileRecord, add_file, result_file_id
from shared.volume import STEP_METRICS
from worker.training.results_log import count_rows

log = logging.getLogger(__name__)


def register_results(client: redis.Redis, job_id: str, path: Path, *, named: str | None = None) -> str | None:
    """Register `path` as the job's result file when it holds at least one step; its id, else None. `named`: the
    path the API knows it by, when that is another host's (object storage).

    Called when the job ends, whatever the outcome, before the outcome is recorded: a client that sees
    the job ended already finds the file listed on it.
    """
    try:
        text = path.read_text()
    except OSError:
        return None
    rows = count_rows(text)
    if rows == 0:
        return None
    record = FileRecord(
        id=result_file_id(job_id),
        bytes=len(text.encode()),
        created_at=int(time.time()),
        filename=STEP_METRICS,
        purpose=RESULTS_PURPOSE,
        path=named or str(path),
        num_records=rows,
    )
    try:
        add_file(client, record)
    except redis.RedisError as exc:  # the job's own outcome matters more than its metrics file
        log.warning("job %s: could not register its result file: %s", job_id, exc)
        return None
    return record.id
