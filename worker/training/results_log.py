"""A run's result file: OpenAI's `step_metrics.csv`, one row per logged step, appended as the run goes.

The header is OpenAI's, exactly; an unknown value is an empty cell. The job's runner registers the file
when the job ends (`worker.jobs.results`) and the API serves it as a `fine-tune-results` file.

Why the worker writes it rather than the API building it from the `metrics` events on demand: the
event stream is capped (~100k entries) and pruned with the job, so a long run's early steps would be
missing from it; and a row appended (and flushed) at each logging step survives a run that fails or
is cancelled half-way, with nothing to reconstruct. The API only serves what is on the volume.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from shared.metrics import StepMetrics

COLUMNS = ("step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy")
HEADER = ",".join(COLUMNS) + "\n"


def _cell(value: float | int | None) -> str:
    # repr of a float round-trips exactly and never uses a comma or a locale's decimal separator.
    return "" if value is None else repr(value)


def csv_row(metrics: StepMetrics) -> str:
    """One logged step as a CSV line (with its newline)."""
    values = (metrics.step, metrics.loss, metrics.accuracy, metrics.valid_loss, metrics.valid_accuracy)
    return ",".join(_cell(v) for v in values) + "\n"


def csv_text(steps: Iterable[StepMetrics]) -> str:
    """The whole file for `steps`, header first."""
    return HEADER + "".join(csv_row(m) for m in steps)


def count_rows(text: str) -> int:
    """Logged steps in a file's text (its lines after the header)."""
    return max(0, len(text.splitlines()) - 1)


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
