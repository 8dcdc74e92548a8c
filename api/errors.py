"""What can go wrong below the routes, as domain exceptions: no status codes here.

Submission, uploads, storage and lookups raise these; `api.error_responses` maps each class to the
native error body and `api.openai.errors` to OpenAI's, one table each.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import Any

import redis

from api.dataset_validation import Problem


class ServiceError(Exception):
    """A request the service refuses or could not serve.

    `problems`: precise places and reasons (`loc` is the request part and field or line, as in
    FastAPI's validation errors).
    """

    def __init__(self, message: str, *, problems: Sequence[dict[str, Any]] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.problems = list(problems)

    @property
    def param(self) -> str | None:
        """The request field the error is about: the first place named."""
        loc = self.problems[0].get("loc") if self.problems else None
        return str(loc[0]) if loc else None

    def details(self) -> dict[str, Any]:
        """Extra fields for the native error body."""
        return {}


def field_error(loc: Sequence[str], msg: str, **kw: Any) -> dict[str, Any]:
    """One entry of `problems`."""
    return {"loc": list(loc), "msg": msg, **kw}


# --- the request itself ----------------------------------------------------------------------------


class MalformedRequest(ServiceError):
    """The body cannot be read as what the endpoint takes (broken multipart, a cursor we never issued)."""


class UnsupportedOption(ServiceError):
    """A well-formed request for something this server does not do."""


class UnsupportedParameter(UnsupportedOption):
    """A request parameter this server does not honour, set anyway (refused rather than ignored)."""

    def __init__(self, name: str, what: str) -> None:
        super().__init__(
            f"{name} is not supported by this server's {what}", problems=[field_error([name], "not supported")]
        )


class UnsupportedMediaType(ServiceError):
    """The body is not in a media type the endpoint reads."""


class PayloadTooLarge(ServiceError):
    """An upload or form field over its limit."""


class UploadStalled(ServiceError):
    """The client stopped sending in the middle of an upload."""


class InvalidInput(ServiceError):
    """A config, path or other field that fails validation (the problems name each field)."""


class ModelNotAllowed(InvalidInput):
    """A base model that does not exist or that this deployment does not allow (api.base_models' rule)."""


class InvalidDataset(InvalidInput):
    """A dataset that fails validation (the problems name each line or record)."""

    def __init__(self, part: str, problems: Sequence[Problem], truncated: bool, summary: str) -> None:
        message = summary if part == "file" else f"{part}: {summary}"
        super().__init__(message, problems=[field_error([part, p.where], p.reason) for p in problems])
        self.truncated = truncated

    def details(self) -> dict[str, Any]:
        return {"truncated": self.truncated}


class UnknownFile(InvalidInput):
    """A request names an uploaded file that does not exist (any more)."""


class WrongDataKind(InvalidInput):
    """A dataset of the wrong kind for the training method (chat records for DPO, preference pairs for SFT)."""


# --- what the request names --------------------------------------------------------------------------


class NotFound(ServiceError):
    """A job, file or checkpoint that does not exist."""


class JobNotFound(NotFound):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job {job_id!r}")


class FileNotFound(NotFound):
    def __init__(self, file_id: str, message: str | None = None) -> None:
        super().__init__(message or f"no file {file_id!r}")


class ModelNotFound(NotFound):
    """A chat completion or model lookup names no model this service serves."""

    def __init__(self, model: str, reason: str = "") -> None:
        super().__init__(
            f"The model {model!r} does not exist{reason}: use a base model that was trained on, a succeeded job's "
            "fine_tuned_model (or job id), or one of its checkpoints (GET /v1/models lists them)",
            problems=[field_error(["model"], "no such model")],
        )


# --- the state of the service --------------------------------------------------------------------------


class SlotsBusy(ServiceError):
    """Every training slot is taken."""

    def __init__(self, running: list[str]) -> None:
        names = ", ".join(running)
        super().__init__(f"Training already in progress (job {names}); every training slot is taken")
        self.running = running

    def details(self) -> dict[str, Any]:
        return {"running_jobs": self.running}


class NoWorkers(ServiceError):
    """No training worker is up: there is no slot at all (a job that may wait joins the waiting line instead)."""

    def __init__(self, within_s: float) -> None:
        super().__init__(
            f"no training worker is up (none has reported in the last {within_s:.0f} s), so no job can start; "
            "start a worker, or submit through /v1/fine_tuning/jobs to wait in the queue for one"
        )


class QueueFull(ServiceError):
    """Every slot is taken and the waiting line is at LORA_MAX_QUEUED_JOBS."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"the queue is full: every training slot is taken and {limit} jobs already wait "
            "(LORA_MAX_QUEUED_JOBS); try again when one has started"
        )
        self.limit = limit

    def details(self) -> dict[str, Any]:
        return {"max_queued_jobs": self.limit}


class GenerationQueueFull(ServiceError):
    """LORA_GENERATION_MAX_PENDING chat completions already wait for a generation worker."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"too many chat completions are waiting: {limit} already wait for a generation worker "
            "(LORA_GENERATION_MAX_PENDING); try again shortly"
        )


class GenerationUnavailable(ServiceError):
    """No generation worker has reported lately: nothing would answer."""


class GenerationTimedOut(ServiceError):
    """A chat completion did not finish within LORA_GENERATION_TIMEOUT_S."""


class GenerationFailed(ServiceError):
    """The generation worker could not generate (out of memory, a model that cannot run)."""


class WrongJobState(ServiceError):
    """The job is not in a state that allows this (no adapter yet, say)."""

    def __init__(self, message: str, status: str) -> None:
        super().__init__(message)
        self.status = status

    def details(self) -> dict[str, Any]:
        return {"status": self.status}


class NotPausable(WrongJobState):
    """Pausing a job that is neither queued nor running, or resuming one that is not paused."""


class OutputInUse(ServiceError):
    """An output folder holds something the service did not write (a base model, the user's files)."""

    def __init__(self, field: str, path: str, reason: str, loc: str = "config") -> None:
        msg = f"{path!r} {reason}; the service never replaces it (choose another path, or empty it first)"
        super().__init__(f"{field}: {msg}", problems=[field_error([loc, field], msg)])
        self.path = path

    def details(self) -> dict[str, Any]:
        return {"path": self.path}


class JobAlreadyEnded(WrongJobState):
    """Cancelling a job that has already ended."""

    def __init__(self, job_id: str, status: str) -> None:
        super().__init__(f"job {job_id!r} has already ended ({status}); nothing to cancel", status)


class VolumeFull(ServiceError):
    """The volume (or the quota on it) has no room left."""

    def __init__(self, what: str) -> None:
        super().__init__(f"not enough disk space on the volume to store the {what}")


class StorageFailed(ServiceError):
    """Writing to the volume failed for another reason (the message says which, never the path)."""


def storage_failure(exc: OSError, what: str) -> VolumeFull | StorageFailed:
    """VolumeFull when the volume (or the quota on it) is full, else StorageFailed saying what failed."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return VolumeFull(what)
    return StorageFailed(f"could not store the {what} on the volume: {exc.strerror or exc.__class__.__name__}")


class BrokerUnavailable(ServiceError):
    """The broker did not accept the job's task."""


class StoreUnavailable(ServiceError):
    """Redis (job store and broker) is unreachable."""


class ObjectStoreDown(ServiceError):
    """The object store (LORA_STORAGE_URL) could not be reached or refused a call: the message says which."""


REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)


def store_unavailable(exc: Exception, redis_url: str) -> StoreUnavailable:
    """The one way "Redis is down" is told, whichever surface the request came through."""
    return StoreUnavailable(
        f"the broker/job store (Redis at {redact_url(redis_url)}) is unreachable: {exc}; try again shortly"
    )


def redact_url(url: str) -> str:
    """A connection URL with any password hidden."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
