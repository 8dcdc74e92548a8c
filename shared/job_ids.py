"""The one job-id rule: how ids are made, and which strings are accepted as one."""

from __future__ import annotations

import re
import uuid

# An id read from a URL is accepted only in this form, so it can never name another Redis key
# (`job-1:events`) or a path outside a job's folder (`..`).
_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,100}$")


def new_job_id() -> str:
    return f"job-{uuid.uuid4().hex[:20]}"


def is_job_id(value: str) -> bool:
    return bool(_JOB_ID.match(value))
