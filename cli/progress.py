"""Showing a job's progress: a bar line from the job's progress, drawn live from its event stream."""

from __future__ import annotations

import contextlib
import time
from typing import TextIO

import httpx

from client import ApiClientError, LoraClient
from shared.jobs import JobStatus, Progress
from shared.metrics import StepMetrics


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = max(0, round(seconds))
    h, m, sec = s // 3600, s % 3600 // 60, s % 60
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def progress_line(p: Progress, width: int = 24, eval_loss: float | None = None, status: JobStatus | None = None) -> str:
    """`[#####-----]  40/200  20%  epoch 3/10  loss 5.1234  eval 5.3  1234 tok/s  ETA 0:12`; with the job's
    `status` when it is known: no ETA unless it is running (an ended or paused job has no time left)."""
    frac = min(1.0, p.current_step / p.total_steps) if p.total_steps else 0.0
    filled = round(frac * width)
    parts = [
        f"[{'#' * filled}{'-' * (width - filled)}]",
        f"{p.current_step}/{p.total_steps or '?'}",
        f"{frac * 100:3.0f}%",
        f"epoch {p.current_epoch}/{p.total_epochs or '?'}",
    ]
    if p.loss is not None:
        parts.append(f"loss {p.loss:.4f}")
    if eval_loss is not None:
        parts.append(f"eval {eval_loss:.4f}")
    if p.tokens_per_second:
        parts.append(f"{p.tokens_per_second:.0f} tok/s")
    if status is None or status in (JobStatus.running, JobStatus.pausing):
        parts.append(f"ETA {_duration(p.eta_seconds)}")
    else:
        parts.append(status.value)
    return "  ".join(parts)


class ProgressView:
    """One redrawn line on a terminal; otherwise a line at most every `every_s` seconds, and the latest
    state before any other message and at the end, so the log never stops short of where the job got."""

    def __init__(self, out: TextIO, every_s: float = 1.0) -> None:
        self.out = out
        self.tty = out.isatty()
        self.every_s = every_s
        self._last = 0.0
        self._drawn = False  # terminal: a bar is on the current line
        self._pending: str | None = None  # log: the latest line not written yet
        self._latest: tuple[Progress, float | None] | None = None  # what the last update showed

    def update(self, p: Progress, eval_loss: float | None = None) -> None:
        now = time.monotonic()
        self._latest = (p, eval_loss)
        line = progress_line(p, eval_loss=eval_loss)
        final = bool(p.total_steps) and p.current_step >= p.total_steps
        if self.tty:
            self.out.write("\r\033[K" + line)
            self._drawn = True
        elif final or now - self._last >= self.every_s:
            self.out.write(line + "\n")
            self._pending = None
        else:
            self._pending = line
            return
        self._last = now
        self.out.flush()

    def message(self, text: str) -> None:
        self.end_line()
        self.out.write(text + "\n")
        self.out.flush()

    def finish(self, status: JobStatus) -> None:
        """The job ended (as `status`): its last line, drawn again with the outcome in place of an ETA."""
        if self._latest is not None and (self._drawn or self._pending is not None):
            p, eval_loss = self._latest
            line = progress_line(p, eval_loss=eval_loss, status=status)
            if self._drawn:
                self.out.write("\r\033[K" + line)
            else:
                self._pending = line
        self.end_line()
        self.out.flush()

    def end_line(self) -> None:
        if self._drawn:
            self.out.write("\n")
            self._drawn = False
        if self._pending is not None:
            self.out.write(self._pending + "\n")
            self._pending = None


class LiveProgress:
    """What to show: each metrics event's numbers over the job record's totals and ETA (re-read every few s)."""

    def __init__(self, client: LoraClient, job_id: str, refresh_s: float = 2.0) -> None:
        self.client, self.job_id, self.refresh_s = client, job_id, refresh_s
        self.record = Progress()
        self.eval_loss: float | None = None
        self._read_at = -refresh_s

    def _record(self) -> Progress:
        interval = self.refresh_s if self.record.total_steps else 0.5
        if time.monotonic() - self._read_at >= interval:
            # On a failed read keep the last record: the stream is what matters.
            with contextlib.suppress(ApiClientError, httpx.TransportError):
                self.record = self.client.job(self.job_id).progress
            self._read_at = time.monotonic()
        return self.record

    def apply(self, metrics: StepMetrics) -> Progress:
        """The record's progress moved on to the step `metrics` reports (totals stay the record's)."""
        base = self._record()
        step, total = metrics.step, base.total_steps
        # The record's smoothed ETA, carried on to this step; none until the worker knows the rate (one
        # step's own time would bring back the jumps the smoothing is there to avoid).
        eta = base.eta_seconds
        if total and base.eta_seconds is not None and 0 < base.current_step < step:
            eta = base.eta_seconds * (total - step) / max(1, total - base.current_step)
        return base.model_copy(
            update={
                "current_step": step,
                "current_epoch": metrics.epoch,
                "loss": metrics.loss,
                "tokens_per_second": metrics.tokens_per_second or base.tokens_per_second,
                "eta_seconds": eta,
            }
        )
