"""Writing and registering a job's result file (`shared.results`' CSV of its logged steps).

Why the worker writes it rather than the API building it from the `metrics` events on demand: the
event stream is capped (~100k entries) and pruned with the job, so a long run's early steps would be
missing from it; and a row appended (and flushed) at each logging step survives a run that fails or
is cancelled half-way, with nothing to reconstruct. The API only serves what is on the volume.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import redis

from shared.files import RESULTS_PURPOSE, FileRecord, add_file, result_file_id
from shared.metrics import StepMetrics
from shared.results import HEADER, count_rows, csv_row
from shared.volume import STEP_METRICS

log = logging.getLogger(__name__)


class ResultsLog:
    """Appends one CSV row per logged step to `path` (None: keeps no file, as for library calls)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.started = False

    def resume_at(self, step: int) -> None:
        """The run continues from its state saved at `step`: the rows up to it stay, later ones (logged
        after that save by a run that then died) go, so no step appears twice."""
        if self.path is None or not self.path.is_file():
            return
        lines = self.path.read_text().splitlines(keepends=True)
        kept = [line for line in lines[1:] if line.split(",", 1)[0].isdigit() and int(line.split(",", 1)[0]) <= step]
        self.path.write_text(HEADER + "".join(kept))
        self.started = True

    def add(self, metrics: StepMetrics) -> None:
        if self.path is None:
            return
        if not self.started:
            # A run (or a retried attempt from step 0) starts its file afresh: rows of an earlier attempt
            # are not this run's. A run that continues a saved state calls `resume_at` first.
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(HEADER)
            self.started = True
        with self.path.open("a") as fh:
            fh.write(csv_row(metrics))


def register_results(client: redis.Redis, job_id: str, path: Path) -> str | None:
    """Register `path` as the job's result file when it holds at least one step; its id, else None.

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
        path=str(path),
        num_records=rows,
    )
    try:
        add_file(client, record)
    except redis.RedisError as exc:  # the job's own outcome matters more than its metrics file
        log.warning("job %s: could not register its result file: %s", job_id, exc)
        return None
    return record.id
