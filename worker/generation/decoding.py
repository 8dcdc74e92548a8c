"""One chat completion on a loaded model: the chat template's prompt, a token-by-token decoding loop
with a KV cache, OpenAI's sampling (temperature 0 = greedy, top_p, seed) and stopping (eos, the
template's end-of-turn token, `stop` strings, `max_tokens`).

A hand-written loop rather than `model.generate`: it emits text as each token arrives, checks the
request's deadline and cancel flag between tokens, and knows exactly why it stopped.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch

from shared.generation import GenerationDone, GenerationRequest, SamplingSpec
from worker.generation.model_cache import LoadedBase, ModelCache, inference
from worker.generation.stop_text import StopText
from worker.training.chat_template import render


class GenerationStopped(Exception):
    """The request was given up (its deadline passed, or the API cancelled it)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class PromptError(ValueError):
    """The conversation cannot be rendered with the model's chat template."""


Emit = Callable[[str], None]
CheckStop = Callable[[], None]  # raises GenerationStopped when the request is to end now


def prompt_ids(base: LoadedBase, request: GenerationRequest) -> list[int]:
    messages = [m.model_dump() for m in request.messages]
    if not getattr(base.tokenizer, "chat_template", None):
        raise PromptError(f"{base.name} has no chat template")
    try:
        text = render(base.tokenizer, messages, add_generation_prompt=True)
    except Exception as exc:  # a template may refuse a role or an order (Jinja raises its own errors)
        raise PromptError(f"the chat template of {base.name} cannot render these messages: {exc}") from exc
    ids: list[int] = base.tokenizer(text, add_special_tokens=False)["input_ids"]  # the template holds its bos
    context = getattr(base.model.config, "max_position_embeddings", None)
    if isinstance(context, int) and len(ids) >= context:
        raise PromptError(f"the conversation is {len(ids)} tokens; {base.name} takes at most {context - 1}")
    return ids


def _sampler(spec: SamplingSpec, device: torch.device) -> Callable[[torch.Tensor], int]:
    if spec.temperature == 0:
        return lambda logits: int(logits.argmax())
    generator = torch.Generator(device=device)
    generator.manual_seed(spec.seed if spec.seed is not None else random.getrandbits(63))

    def pick(logits: torch.Tensor) -> int:
        probs = torch.softmax(logits.float() / spec.temperature, dim=-1)
        if spec.top_p >= 1.0:
            return int(torch.multinomial(probs, 1, generator=generator))
        ordered, order = probs.sort(descending=True)
        # Keep the smallest set of most likely tokens whose mass reaches top_p (at least the first).
        ordered[(ordered.cumsum(0) - ordered) >= spec.top_p] = 0.0
        return int(order[torch.multinomial(ordered, 1, generator=generator)])

    return pick


def generate(
    cache: ModelCache, request: GenerationRequest, emit: Emit, check_stop: CheckStop = lambda: None
) -> GenerationDone:
    """Generate the request's answer, calling `emit` with each new piece of text; the finish reason and usage."""
    base, adapter = cache.get(request.base_model, request.adapter_path)
    spec = request.sampling
    ids = prompt_ids(base, request)
    pick = _sampler(spec, cache.device)
    stops = StopText([*spec.stop, *base.stop_texts])
    generated: list[int] = []
    sampled = 0  # tokens picked, the closing one (eos, end of turn) included: OpenAI's completion_tokens
    stopped = False
    with inference(), base.use(adapter):
        past = None
        step_input = torch.tensor([ids], device=cache.device)
        while sampled < spec.max_tokens and not stopped:
            check_stop()
            kv: dict[str, Any] = {base.cache_arg: past} if past is not None else {}
            out = base.model(input_ids=step_input, use_cache=True, logits_to_keep=1, **kv)
            past = getattr(out, base.cache_arg)
            token = pick(out.logits[0, -1])
            sampled += 1
            if token in base.stop_token_ids:
                stopped = True
                break
            generated.append(token)
            piece, stopped = stops.feed(base.tokenizer.decode(generated, skip_special_tokens=True))
            if piece:
                emit(piece)
            step_input = torch.tensor([[token]], device=cache.device)
    if not stops.reached and (rest := stops.finish(base.tokenizer.decode(generated, skip_special_tokens=True))):
        emit(rest)  # what was held back in case it began a stop string
    return GenerationDone(
        finish_reason="stop" if stopped else "length", prompt_tokens=len(ids), completion_tokens=sampled
    )
