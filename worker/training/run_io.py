"""What a run is handed besides its config and data: where it writes (`RunPaths`) and who steers it
(`RunControl`). A job's runner builds both once from the volume's layout and its lease; a library call
gets the defaults (an output folder only, events logged, never stopped)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from shared.events import EventPayload
from shared.jobs import Progress
from shared.volume import Volume

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RunPaths:
    """Where one run writes. Only `output` is required: a run without the others keeps no checkpoints,
    no result file and no resumable state."""

    output: Path  # the adapter folder (staged, then swapped into place)
    checkpoints: Path | None = None  # epoch-end adapter checkpoints, `step-NNNNNN/` each
    results: Path | None = None  # the CSV of logged steps (OpenAI's step_metrics.csv)
    state: Path | None = None  # the resumable training state (`worker.training.train_state`)
    state_every_s: float = 0.0  # seconds between state saves (0: off; saves at epoch ends and on a pause only)
    state_every: int = 0  # steps between state saves too (0: off); exact steps, which tests rely on
    job_id: str | None = None  # the job this run is (names its W&B run); None for a library call
    # Called with each folder the run has completed (a saved state, a checkpoint) once it is in place: a job
    # on object storage sends it to the store from here (worker.jobs.staging). It may raise: a state it
    # failed for counts as not saved.
    publish: Callable[[Path], None] | None = None

    def __post_init__(self) -> None:
        for name in ("output", "checkpoints", "results", "state"):  # a caller may give plain strings
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        if self.state_every < 0 or self.state_every_s < 0:
            raise ValueError("state_every and state_every_s must be >= 0")

    @classmethod
    def of_job(cls, volume: Volume, job_id: str, output: Path, *, state_every_s: float, state_every: int,
               publish: Callable[[Path], None] | None = None) -> RunPaths:  # fmt: skip
        """A job's paths, from the volume's layout and its id."""
        return cls(
            output=output,
            checkpoints=volume.job_checkpoints(job_id),
            results=volume.step_metrics(job_id),
            state=volume.job_state(job_id),
            state_every_s=state_every_s,
            state_every=state_every,
            job_id=job_id,
            publish=publish,
        )

    @property
    def run_name(self) -> str:
        return self.job_id or self.output.name


class RunControl(Protocol):
    """Who steers a run: the job's lease (`worker.jobs.lease.LeaseKeeper`) or, in a library call,
    `LocalControl`. Every method is called on the training thread and must return at once."""

    def publish(self, progress: Progress) -> None:
        """The run's progress after a step (the latest replaces the one before)."""

    def emit(self, event: EventPayload, message: str) -> None:
        """A typed event (`shared.events`) with its human-readable line."""

    def status(self, message: str) -> None:
        """What the run is doing now, in a line (a job's message, as /status shows it): the latest replaces
        the one before."""

    def should_stop(self) -> bool:
        """Polled before every step (and while data is read): true ends the run without saving."""

    def pause_requested(self) -> bool:
        """Asked when `should_stop` ended the run: true makes the stop a pause (the state is saved)."""


@dataclass(frozen=True, slots=True)
class LocalControl:
    """A library call's control, from plain callables: by default events go to the log, progress
    nowhere, and nothing stops the run."""

    on_progress: Callable[[Progress], None] | None = None
    on_event: Callable[[EventPayload, str], None] | None = None
    stop: Callable[[], bool] | None = None  # `should_stop`
    pause: Callable[[], bool] | None = None  # `pause_requested`

    def publish(self, progress: Progress) -> None:
        if self.on_progress is not None:
            self.on_progress(progress)

    def emit(self, event: EventPayload, message: str) -> None:
        if self.on_event is not None:
            self.on_event(event, message)
        else:
            log.info("%s: %s", type(event).__name__, message)

    def status(self, message: str) -> None:
        log.debug("%s", message)  # a library call's events say it too

    def should_stop(self) -> bool:
        return self.stop is not None and self.stop()

    def pause_requested(self) -> bool:
        return self.pause is not None and self.pause()
