"""OpenAI-style names for what the service trained, and reading them back.

A finished job's model is `ft:{base model}:{suffix}:{job id}` (empty suffix when none was given), a
checkpoint's `ft:{base model}:{suffix}:{job id}:ckpt-step-{step}`. The base model may itself hold
colons (a path never does on the volume, but a hub id could): names are read from the right.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shared.job_ids import is_job_id

PREFIX = "ft:"
_CHECKPOINT = re.compile(r"^ckpt-step-(\d{1,12})$")
_BARE_JOB_ID = re.compile(r"^job-[A-Za-z0-9_-]{1,96}$")  # a bare name is a job only in the service's own form


def fine_tuned_model_name(model: str, suffix: str | None, job_id: str) -> str:
    return f"{PREFIX}{model}:{suffix or ''}:{job_id}"


def checkpoint_model_name(model: str, suffix: str | None, job_id: str, step: int) -> str:
    return f"{fine_tuned_model_name(model, suffix, job_id)}:ckpt-step-{step}"


@dataclass(frozen=True)
class ModelRef:
    """What a `ft:` name points at: a job's adapter, or one of its checkpoints."""

    job_id: str
    step: int | None = None  # a checkpoint's step; None for the job's final adapter


def parse_model_name(name: str) -> ModelRef | None:
    """The job (and checkpoint) a `ft:` name names, or None when it is not one of ours. A bare job id
    is accepted too. The base model and suffix in the name are not trusted: the job record says them."""
    if _BARE_JOB_ID.match(name):
        return ModelRef(name)
    if not name.startswith(PREFIX):
        return None
    parts = name[len(PREFIX) :].split(":")
    step = None
    if parts and (match := _CHECKPOINT.match(parts[-1])):
        step = int(match.group(1))
        parts = parts[:-1]
    if len(parts) < 3 or not is_job_id(parts[-1]):
        return None
    return ModelRef(parts[-1], step)
