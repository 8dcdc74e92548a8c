"""Tinker's `sample` on a loaded model: token ids in, `num_samples` continuations out, each token with its
log-probability, and the prompt's own log-probabilities when asked (`compute_logprobs`).

The samples are one batch of `num_samples` rows: the prompt is run once (its KV cache then repeated per
row), and every step feeds each row its last token. A row that has stopped is still fed (the batch keeps
its shape) but what it produces is ignored.

Why each token's log-probability is taken from the model's raw logits (temperature 1, before top-k/top-p)
and not from the distribution it was drawn from: the logprobs are what RL losses divide by (importance
sampling, PPO: the ratio p_train(token) / p_sampler(token)), and the trainer computes p_train as a plain
forward's log_softmax. Reporting the tempered or truncated distribution would bias every ratio by the
sampling settings rather than measure how far the weights moved. The token is still drawn with the
request's temperature, top_k and top_p.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from shared.tinker_ops import SampledSequence, SampleOp, SampleResult

CheckStop = Callable[[], None]  # raises to end the request now (its deadline passed)


class SampleInputError(ValueError):
    """The request cannot be served as given (a token id the model does not have, an empty prompt, ...)."""


def eos_token_ids(tokenizer: Any, model: Any) -> frozenset[int]:
    """What ends a sequence: the tokenizer's eos token and the model's generation_config eos ids."""
    ids: set[int] = set()
    for source in (getattr(tokenizer, "eos_token_id", None), getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list):
            ids.update(i for i in source if isinstance(i, int))
    return frozenset(ids)


def vocab_size(model: Any) -> int:
    """How many token ids the model can take: the rows of its input embedding."""
    return int(model.get_input_embeddings().weight.shape[0])


def check_tokens(op: SampleOp, vocab: int, context: int | None) -> None:
    if not op.prompt:
        raise SampleInputError("the prompt is empty: sampling needs at least one token")
    for i, token in enumerate(op.prompt):
        if not 0 <= token < vocab:
            raise SampleInputError(
                f"prompt token {token} (position {i}) is outside the model's vocabulary (0..{vocab - 1})"
            )
    if context is not None and len(op.prompt) >= context:
        raise SampleInputError(f"the prompt is {len(op.prompt)} tokens; the model takes at most {context - 1}")
    if op.num_samples < 1:
        raise SampleInputError(f"num_samples must be at least 1, not {op.num_samples}")
    if op.temperature < 0:
        raise SampleInputError(f"temperature must not be negative, not {op.temperature}")
    if not 0 < op.top_p <= 1:
        raise SampleInputError(f"top_p must be in (0, 1], not {op.top_p}")


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    """One generator per request: the same seed draws the same samples; no seed draws fresh ones."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else random.getrandbits(63))
    return generator


def pick(logits: torch.Tensor, op: SampleOp, generator: torch.Generator) -> torch.Tensor:
    """One token per row of `logits` ([rows, vocab], float): argmax at temperature 0, else a draw."""
    if op.temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits / op.temperature
    if 0 < op.top_k < scaled.shape[-1]:
        kth = scaled.topk(op.top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if op.top_p < 1.0:
        ordered, order = probs.sort(dim=-1, descending=True)
        # The smallest set of most likely tokens whose mass reaches top_p (at least the first).
        ordered = ordered.masked_fill((ordered.cumsum(dim=-1) - ordered) >= op.top_p, 0.0)
        chosen = torch.multinomial(ordered, 1, generator=generator)
        return order.gather(-1, chosen).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class _Row:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    stop_reason: str | None = None  # set once the row has ended

    def sequence(self) -> SampledSequence:
        return SampledSequence(tokens=self.tokens, logprobs=self.logprobs, stop_reason=self.stop_reason or "length")  # type: ignore[arg-type]


class _StopStrings:
    """Whether a row's decoded continuation contains one of the stop strings yet."""

    def __init__(self, tokenizer: Any, stops: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]

    def reached(self, tokens: list[int]) -> bool:
        if not self.stops:
            return False
        text = self.tokenizer.decode(tokens, skip_special_tokens=False)
        return any(stop in text for stop in self.stops)


def _repeat_cache(past: Any, rows: int) -> Any:
    if rows > 1:
        past.batch_repeat_interleave(rows)
    return past


def sample(
    model: Any,
    tokenizer: Any,
    op: SampleOp,
    *,
    cache_arg: str = "past_key_values",
    check_stop: CheckStop = lambda: None,
) -> SampleResult:
    """`op.num_samples` continuations of `op.prompt` (token ids) on `model` as it is (adapter already applied).

    Runs under the caller's no-grad/inference context. Raises SampleInputError for a request that cannot be
    served as given; whatever `check_stop` raises ends it between two tokens.
    """
    device = next(model.parameters()).device
    context = getattr(model.config, "max_position_embeddings", None)
    check_tokens(op, vocab_size(model), context if isinstance(context, int) else None)
    eos = eos_token_ids(tokenizer, model) if op.stop_at_eos else frozenset()
    stop_tokens = frozenset(op.stop_tokens)
    stop_strings = _StopStrings(tokenizer, op.stop_strings)
    generator = _generator(op.seed, device)
    max_new = op.max_tokens
    if isinstance(context, int):
        max_new = min(max_new, context - len(op.prompt))  # past the context the model has no positions

    check_stop()
    prompt = torch.tensor([op.prompt], device=device)
    # The prefill's logits at every position give the prompt's log-probabilities; only the last is needed otherwise.
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=0 if op.prompt_logprobs else 1)
    prompt_logprobs: list[float | None] | None = None
    if op.prompt_logprobs:
        scores = torch.log_softmax(out.logits[0, :-1].float(), dim=-1)
        taken = scores.gather(-1, prompt[0, 1:].unsqueeze(-1)).squeeze(-1)
        prompt_logprobs = [None, *(float(v) for v in taken.tolist())]
    past = _repeat_cache(getattr(out, cache_arg), op.num_samples)
    logits = out.logits[:, -1].float().expand(op.num_samples, -1)

    rows = [_Row() for _ in range(op.num_samples)]
    for step in range(max_new):
        if step > 0:
            check_stop()
            feed = torch.tensor([[row.tokens[-1]] for row in rows], device=device)
            out = model(input_ids=feed, use_cache=True, logits_to_keep=1, **{cache_arg: past})
            past = getattr(out, cache_arg)
            logits = out.logits[:, -1].float()
        chosen = pick(logits, op, generator)
        # Temperature 1, before top-k/top-p: what the trainer's forward computes (see the module's docstring).
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
        for row, token, logprob in zip(rows, chosen.tolist(), logprobs.tolist(), strict=True):
            if row.stop_reason is not None:
                continue
            row.tokens.append(int(token))
            row.logprobs.append(float(logprob))
            if token in stop_tokens or token in eos or stop_strings.reached(row.tokens):
                row.stop_reason = "stop"
        if all(row.stop_reason is not None for row in rows):
            break
    for row in rows:
        if row.stop_reason is None:
            row.stop_reason = "length"
    return SampleResult(sequences=[row.sequence() for row in rows], prompt_logprobs=prompt_logprobs)
