"""The calls a Tinker training client makes, as the API queues them for the worker hosting its model, and
what the worker answers: the service's own JSON shapes, decoded from and encoded to the SDK's wire format
by the API (api.tinker)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

LossName = Literal["cross_entropy", "importance_sampling", "ppo", "cispo", "dro"]
LOSS_NAMES: tuple[LossName, ...] = ("cross_entropy", "importance_sampling", "ppo", "cispo", "dro")
# What each built-in loss reads from `loss_fn_inputs` besides `target_tokens`.
LOSS_INPUTS: dict[LossName, tuple[str, ...]] = {
    "cross_entropy": ("weights",),
    "importance_sampling": ("logprobs", "advantages"),
    "ppo": ("logprobs", "advantages"),
    "cispo": ("logprobs", "advantages"),
    "dro": ("logprobs", "advantages"),
}
# `loss_fn_config` keys each loss reads (others are refused: a typo must not silently train differently).
LOSS_CONFIG_KEYS: dict[LossName, tuple[str, ...]] = {
    "cross_entropy": (),
    "importance_sampling": (),
    "ppo": ("clip_low_threshold", "clip_high_threshold"),
    "cispo": ("clip_low_threshold", "clip_high_threshold"),
    "dro": ("beta",),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TinkerDatum(_Strict):
    """One datum: the input tokens and, per position, the token it must predict and the loss's inputs."""

    tokens: list[int]
    target_tokens: list[int]
    weights: list[float] | None = None
    logprobs: list[float] | None = None  # the sampler's log-probability of each target token
    advantages: list[float] | None = None


class ForwardOp(_Strict):
    op: Literal["forward", "forward_backward"]
    loss_fn: LossName
    loss_fn_config: dict[str, float] | None = None
    data: list[TinkerDatum]


class OptimStepOp(_Strict):
    op: Literal["optim_step"] = "optim_step"
    learning_rate: float
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0  # 0: no clipping


class SaveOp(_Strict):
    op: Literal["save_weights", "save_weights_for_sampler"]
    folder: str  # where the checkpoint goes on the volume (an adapter folder)
    tinker_path: str  # the name clients know it by: tinker://<model_id>/weights/<name>
    name: str  # the checkpoint's name (the last part of `tinker_path`)
    # save_weights_and_get_sampling_client: the sampling session to open on the saved weights (no named checkpoint)
    sampling_session_id: str | None = None


class LoadOp(_Strict):
    op: Literal["load_weights"] = "load_weights"
    folder: str
    tinker_path: str
    optimizer: bool  # also restore the optimizer's state (load_state_with_optimizer)


class UnloadOp(_Strict):
    op: Literal["unload"] = "unload"


TinkerOp = Annotated[ForwardOp | OptimStepOp | SaveOp | LoadOp | UnloadOp, Field(discriminator="op")]


class TinkerCall(_Strict):
    """One queued call for a model; the host runs a model's calls in `seq_id` order."""

    request_id: str
    model_id: str
    seq_id: int
    op: TinkerOp


class ForwardResult(_Strict):
    kind: Literal["forward"] = "forward"
    loss_fn_outputs: list[dict[str, list[float]]]  # per datum: "logprobs", "elementwise_loss"
    metrics: dict[str, float]


class OptimStepResult(_Strict):
    kind: Literal["optim_step"] = "optim_step"
    metrics: dict[str, float] = Field(default_factory=dict)


class SaveResult(_Strict):
    kind: Literal["save"] = "save"
    path: str
    sampling_session_id: str | None = None


class LoadResult(_Strict):
    kind: Literal["load"] = "load"
    path: str


class CreatedResult(_Strict):
    kind: Literal["created"] = "created"
    model_id: str


class UnloadResult(_Strict):
    kind: Literal["unload"] = "unload"
    model_id: str


class SampleOp(_Strict):
    """A sampling client's `sample` (or `compute_logprobs`): served by a generation worker."""

    request_id: str
    model_dir: str  # the base model as the worker loads it
    adapter_dir: str | None = None  # the sampler weights' adapter folder; None samples the base itself
    volume_base: str | None = None  # the base path the API named those under (shared.volume.Volume.localize)
    prompt: list[int]
    num_samples: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: no limit
    stop_strings: list[str] = Field(default_factory=list)
    stop_tokens: list[int] = Field(default_factory=list)
    stop_at_eos: bool = True  # the SDK's `stop=None`; an explicit `[]` stops at nothing, not even end of sequence
    seed: int | None = None
    prompt_logprobs: bool = False
    deadline_ms: int = 0  # Redis server time past which the request is not worth starting


class SampledSequence(_Strict):
    tokens: list[int]
    logprobs: list[float]  # each sampled token's log-probability under the model (temperature 1)
    stop_reason: Literal["stop", "length"]


class SampleResult(_Strict):
    kind: Literal["sample"] = "sample"
    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None  # None at position 0 (no context)


TinkerResult = Annotated[
    ForwardResult | OptimStepResult | SaveResult | LoadResult | CreatedResult | UnloadResult | SampleResult,
    Field(discriminator="kind"),
]
