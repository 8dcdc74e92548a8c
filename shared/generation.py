"""Chat completion generation as the API and the generation workers both know it: the request a worker
pops from the queue, and the events it sends back on the request's own stream.

The API resolves the model name (a `ft:` name, a job id or a base model) to a base model and an
adapter folder before it enqueues, so a worker never reads the job store: it loads what it is told.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

FinishReason = Literal["stop", "length"]
STREAM_FIELD = "data"  # the one field of each output stream entry: a GenerationEvent as JSON


class ChatMessage(BaseModel):
    """One turn, as the chat template receives it (text only)."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class SamplingSpec(BaseModel):
    """How tokens are picked; OpenAI's names and meanings."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)  # 0: greedy
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list, max_length=4)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)


class GenerationRequest(BaseModel):
    """One chat completion to generate: the message a generation worker pops from the queue."""

    model_config = ConfigDict(extra="forbid")

    id: str  # also names the output stream and the cancel flag (shared.keys)
    base_model: (
        str  # what to load, as the API resolved it: a model folder (under base_path or the worker's), or a hub id
    )
    adapter_path: str | None = None  # the adapter folder on the volume; None: the base model alone
    volume_base: str | None = None  # the base path the API named those under (shared.volume.Volume.localize)
    messages: list[ChatMessage] = Field(min_length=1)
    sampling: SamplingSpec
    deadline: float  # seconds since the epoch (the Redis server's clock): stop generating past it


class TextDelta(BaseModel):
    type: Literal["delta"] = "delta"
    text: str


class GenerationDone(BaseModel):
    type: Literal["done"] = "done"
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


GenerationErrorCode = Literal["model_not_found", "timeout", "cancelled", "invalid_request", "generation_failed"]


class GenerationFailed(BaseModel):
    type: Literal["error"] = "error"
    code: GenerationErrorCode
    message: str


GenerationEvent = Annotated[TextDelta | GenerationDone | GenerationFailed, Field(discriminator="type")]
EVENT_ADAPTER: TypeAdapter[TextDelta | GenerationDone | GenerationFailed] = TypeAdapter(GenerationEvent)


def parse_event(raw: str | bytes) -> TextDelta | GenerationDone | GenerationFailed:
    return EVENT_ADAPTER.validate_json(raw)
