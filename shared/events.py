"""A job's event stream: one typed payload per event type, and the event that carries it.

Status changes are written by the Lua scripts (shared.lua_scripts), everything else by the worker
through its lease keeper. The jobs API serves `JobEvent` as it is; the OpenAI layer, the CLI and
the dashboard read the payloads by these names.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.jobs import JobStatus
from shared.metrics import CheckpointSaved, EpochEnd, StepMetrics


class StatusChanged(BaseModel):
    """The job moved to `status` (queued, running, succeeded, failed, cancelled)."""

    status: JobStatus


class CancelRequested(BaseModel):
    """A running job was asked to stop; its worker stops within a few steps."""


class Notice(BaseModel):
    """Something worth telling (a fallback taken, examples skipped, where W&B logs): the event's
    message says it; the details vary and are kept as sent."""

    model_config = ConfigDict(extra="allow")


class WarningNotice(Notice):
    """A notice about something that did not go as configured."""


class InfoNotice(Notice):
    """A notice for information only."""


def info(**details: Any) -> InfoNotice:
    """An info notice with free-form details."""
    return InfoNotice.model_validate(details)


def warning(**details: Any) -> WarningNotice:
    """A warning notice with free-form details."""
    return WarningNotice.model_validate(details)


EventType = Literal["status", "cancel_requested", "metrics", "epoch", "checkpoint", "warning", "info"]
EventPayload = StatusChanged | CancelRequested | StepMetrics | EpochEnd | CheckpointSaved | WarningNotice | InfoNotice

PAYLOADS: dict[str, type[EventPayload]] = {
    "status": StatusChanged,
    "cancel_requested": CancelRequested,
    "metrics": StepMetrics,
    "epoch": EpochEnd,
    "checkpoint": CheckpointSaved,
    "warning": WarningNotice,
    "info": InfoNotice,
}
_TYPES: dict[type[BaseModel], str] = {model: name for name, model in PAYLOADS.items()}


def event_type(payload: EventPayload) -> str:
    """The event type a payload is written under."""
    return _TYPES[type(payload)]


def payload(etype: str, data: dict[str, Any]) -> EventPayload:
    """The typed payload of an event of type `etype`; ValueError for a type no reader knows."""
    model = PAYLOADS.get(etype)
    if model is None:
        raise ValueError(f"unknown event type {etype!r}")
    return model.model_validate(data)


class JobEvent(BaseModel):
    """One entry of a job's event stream."""

    id: str = Field(description="the stream id, 'ms-seq': ordered, usable as a cursor")
    type: EventType
    created_at: float = Field(description="seconds since the epoch")
    message: str
    data: EventPayload = Field(description="the payload of this event type")

    @model_validator(mode="before")
    @classmethod
    def _payload_of_its_type(cls, value: Any) -> Any:
        # The type names the payload's model: never left to a guess among models with like fields.
        if isinstance(value, dict) and isinstance(value.get("data"), dict) and value.get("type") in PAYLOADS:
            value = {**value, "data": payload(value["type"], value["data"])}
        return value
