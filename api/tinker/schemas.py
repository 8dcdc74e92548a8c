"""The JSON bodies the Tinker SDK sends, as far as this server reads them (unknown keys are ignored: the SDK
adds fields between versions), and how a body is read into one."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from api.tinker.errors import TinkerRefusal, bad_request
from shared.settings import Settings

T = TypeVar("T", bound=BaseModel)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class CreateSession(_Body):
    tags: list[str] = Field(default_factory=list)
    user_metadata: dict[str, str] | None = None
    project_id: str | None = None
    display_name: str | None = None


class SessionRef(_Body):
    session_id: str


class LoraConfig(_Body):
    rank: int = 32
    seed: int | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


class CreateModel(_Body):
    session_id: str
    model_seq_id: int = Field(ge=0)
    base_model: str
    lora_config: LoraConfig = Field(default_factory=LoraConfig)
    optimizer_config: dict[str, Any] | None = None
    user_metadata: dict[str, str] | None = None


class ModelRef(_Body):
    model_id: str


class OptimStep(_Body):
    model_id: str
    seq_id: int
    adam_params: dict[str, Any] | None = None
    optimizer_params: dict[str, Any] | None = None
    optim_params: dict[str, Any] | None = None


class SaveWeights(_Body):
    model_id: str
    seq_id: int
    path: str | None = None
    overwrite: bool = False
    ttl_seconds: int | None = None


class SaveWeightsForSampler(_Body):
    model_id: str
    seq_id: int
    path: str | None = None
    sampling_session_seq_id: int | None = Field(default=None, ge=0)
    overwrite: bool = False


class LoadWeights(_Body):
    path: str
    optimizer: bool = False
    # load_state on an existing model
    model_id: str | None = None
    seq_id: int | None = None
    # create_training_client_from_state: a new model
    session_id: str | None = None
    model_seq_id: int | None = Field(default=None, ge=0)
    base_model: str | None = None
    user_metadata: dict[str, str] | None = None


class CreateSamplingSession(_Body):
    session_id: str
    sampling_session_seq_id: int = Field(ge=0)
    model_path: str | None = None
    base_model: str | None = None


class Sample(_Body):
    sampling_session_id: str | None = None
    base_model: str | None = None
    model_path: str | None = None
    seq_id: int | None = None
    num_samples: int = 1
    prompt: dict[str, Any]
    sampling_params: dict[str, Any] = Field(default_factory=dict)
    prompt_logprobs: bool | None = False
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    prompt_alt_tokens_k: int = 0
    target_prompt_logprobs: dict[str, Any] | None = None
    prompt_logprobs_last_n: int | None = None


class RetrieveFuture(_Body):
    request_id: str
    allow_metadata_only: bool = False


class WeightsInfo(_Body):
    tinker_path: str


def _where(loc: tuple[int | str, ...]) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".") or "body"


async def read_body(request: Request, call: str, settings: Settings) -> bytes:
    """The body, refused (400) when it is over LORA_TINKER_MAX_REQUEST_BYTES."""
    limit = settings.tinker_max_request_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(call, int(declared), limit)
    body = await request.body()
    if len(body) > limit:
        raise _too_large(call, len(body), limit)
    return body


def _too_large(call: str, size: int, limit: int) -> TinkerRefusal:
    return bad_request(
        call, "body", f"{size} bytes is over this server's limit of {limit} (LORA_TINKER_MAX_REQUEST_BYTES)"
    )


async def parse(request: Request, model: type[T], call: str, settings: Settings) -> T:
    """The body as `model`; a 400 naming the first bad field otherwise."""
    raw = await read_body(request, call, settings)
    try:
        data = json.loads(raw or b"{}")
    except ValueError as exc:
        raise bad_request(call, "body", f"not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise bad_request(call, "body", "expected a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        raise bad_request(call, _where(tuple(first["loc"])), first["msg"]) from exc
