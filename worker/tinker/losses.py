"""The Tinker SDK's built-in losses, on per-token log-probabilities.

Every loss is a sum over a datum's tokens (not a mean), summed over the data of a call, as the SDK
documents them. With ``lp`` the current policy's log-probability of each target token, ``s`` the
sampler's (``loss_fn_inputs["logprobs"]``), ``A`` the advantages and ``r = exp(lp - s)``:

- ``cross_entropy``:       ``-sum(weights * lp)``
- ``importance_sampling``: ``-sum(r * A)``
- ``ppo``:                 ``-sum(min(r * A, clip(r, low, high) * A))``
- ``cispo``:               ``-sum(stopgrad(clip(r, low, high)) * lp * A)``
- ``dro``:                 ``-sum(lp * A - beta / 2 * (lp - s) ** 2)``

``low``/``high`` are ``loss_fn_config``'s ``clip_low_threshold``/``clip_high_threshold`` (0.8 / 1.2 when
not given); ``beta`` is ``loss_fn_config["beta"]`` (required for ``dro``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from shared.tinker_ops import LossName

DEFAULT_CLIP_LOW = 0.8
DEFAULT_CLIP_HIGH = 1.2


@dataclass(frozen=True, slots=True)
class LossInputs:
    """One call's `loss_fn_inputs`, each flattened over the call's data in the packed order (fp32, on the device)."""

    weights: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None  # the sampler's
    advantages: torch.Tensor | None = None


def bearing_rows(loss_fn: LossName, inputs: LossInputs) -> torch.Tensor:
    """Which tokens the loss can send a gradient through (a bool mask): only those rows need the LM head under autograd."""
    if loss_fn == "cross_entropy":
        assert inputs.weights is not None
        return inputs.weights != 0
    if loss_fn == "dro":  # its quadratic term weighs every token
        assert inputs.logprobs is not None
        return torch.ones_like(inputs.logprobs, dtype=torch.bool)
    assert inputs.advantages is not None
    return inputs.advantages != 0


def elementwise_loss(
    loss_fn: LossName, lp: torch.Tensor, inputs: LossInputs, config: Mapping[str, float] | None = None
) -> torch.Tensor:
    """Each token's term of the loss (same shape as `lp`); the call's loss is their sum."""
    config = config or {}
    if loss_fn == "cross_entropy":
        assert inputs.weights is not None
        return -inputs.weights * lp
    assert inputs.logprobs is not None
    sampled = inputs.logprobs
    if loss_fn == "dro":
        assert inputs.advantages is not None
        beta = float(config["beta"])
        return -(lp * inputs.advantages - 0.5 * beta * (lp - sampled) ** 2)
    assert inputs.advantages is not None
    advantages = inputs.advantages
    ratio = torch.exp(lp - sampled)
    if loss_fn == "importance_sampling":
        return -(ratio * advantages)
    low = float(config.get("clip_low_threshold", DEFAULT_CLIP_LOW))
    high = float(config.get("clip_high_threshold", DEFAULT_CLIP_HIGH))
    clipped = ratio.clamp(low, high)
    if loss_fn == "ppo":
        return -torch.minimum(ratio * advantages, clipped * advantages)
    if loss_fn == "cispo":
        return -(clipped.detach() * lp * advantages)
    raise ValueError(f"unknown loss {loss_fn!r}")
