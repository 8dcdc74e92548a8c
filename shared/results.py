"""A training job's result file: OpenAI's `step_metrics.csv`, one row per logged step.

The worker appends a row at each logging step (`worker.training.results_log`) into the job's folder
(`Volume.step_metrics`) and registers the file at the end of the job (`shared.files`); the API serves
it as a `fine-tune-results` file. The header is OpenAI's, exactly; an unknown value is an empty cell.
"""

from __future__ import annotations

from collections.abc import Iterable

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
