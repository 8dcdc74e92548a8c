"""Weights & Biases logging, used only when configured (WANDB_API_KEY or WANDB_MODE).

Any failure here (package missing, no network, bad key) becomes a warning event: W&B must never
break a training job.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from shared import events
from shared.events import EventPayload, WarningNotice
from shared.jobs import WandbSpec

log = logging.getLogger(__name__)

EventCallback = Callable[[EventPayload, str], None]


def wandb_configured() -> bool:
    return bool(os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"))


class WandbRun:
    """A W&B run, or nothing at all when W&B is not configured or cannot start."""

    def __init__(self, name: str, config: dict[str, Any], emit: EventCallback, spec: WandbSpec | None = None) -> None:
        self._run: Any = None
        self._emit = emit
        if not wandb_configured() or os.environ.get("WANDB_MODE") == "disabled":
            if spec is not None:
                emit(
                    WarningNotice(), "the job asks for a Weights & Biases run, but W&B is not configured on this worker"
                )
            return
        try:
            import wandb

            self._run = wandb.init(
                project=spec.project if spec else os.environ.get("WANDB_PROJECT", "lora-server"),
                entity=spec.entity if spec else None,
                tags=spec.tags if spec else None,
                name=(spec.name if spec else None) or name,
                config=config,
                reinit="finish_previous",
            )
            emit(events.info(wandb_run=str(self._run.id)), f"logging to Weights & Biases run {self._run.name}")
        except Exception as exc:
            self._disable(exc)

    def _disable(self, exc: Exception) -> None:
        self._run = None
        self._emit(WarningNotice(), f"Weights & Biases logging is off: {type(exc).__name__}: {exc}")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self._run is None:
            return
        try:
            self._run.log(metrics, step=step)
        except Exception as exc:
            self._disable(exc)

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        if self._run is None:
            return
        try:
            if summary:
                self._run.summary.update(summary)
            self._run.finish()
        except Exception as exc:
            self._disable(exc)
