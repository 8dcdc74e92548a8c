"""The generation engine and its model cache, on the tiny model with two random adapters (no training
needed: each adapter's answers are checked against that adapter loaded alone), and the worker's handling
of a request through Redis."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis
import torch

from shared import keys
from shared.config import TrainConfig
from shared.generation import (
    ChatMessage,
    GenerationDone,
    GenerationFailed,
    GenerationRequest,
    SamplingSpec,
    parse_event,
)
from shared.generation_queue import server_time
from tests.fixtures.tiny_model import MAX_POSITIONS
from worker.generation.decoding import PromptError, generate
from worker.generation.model_cache import ModelCache
from worker.generation.server import serve_one
from worker.generation.stop_text import StopText

QUESTION = "What is two plus two?"


def _random_adapter(base: Path, out: Path, seed: int) -> Path:
    """An adapter as the worker trains them (LoRA all-linear, embeddings in full), with random weights."""
    from transformers import AutoModelForCausalLM

    from worker.training.model_loading import prepare_model

    model = prepare_model(AutoModelForCausalLM.from_pretrained(str(base)), TrainConfig(model_name=str(base)))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.5)
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("adapters")
    return str(_random_adapter(tiny_model_dir, root / "a", 1)), str(_random_adapter(tiny_model_dir, root / "b", 2))


def _cache(max_adapters: int = 8) -> ModelCache:
    return ModelCache(max_bases=1, max_adapters=max_adapters, device=torch.device("cpu"))


def _request(base: Path, adapter: str | None, deadline: float | None = None, **sampling: object) -> GenerationRequest:
    spec = SamplingSpec.model_validate({"max_tokens": 12, "temperature": 0, **sampling})
    return GenerationRequest(
        id=f"chatcmpl-test{time.monotonic_ns()}",
        base_model=str(base),
        adapter_path=adapter,
        messages=[ChatMessage(role="user", content=QUESTION)],
        sampling=spec,
        deadline=deadline if deadline is not None else time.time() + 60,
    )


def _answer(cache: ModelCache, request: GenerationRequest) -> tuple[str, GenerationDone]:
    pieces: list[str] = []
    done = generate(cache, request, pieces.append)
    return "".join(pieces), done


def test_a_second_request_reuses_the_loaded_base_and_adapter(tiny_model_dir: Path, adapters: tuple[str, str]) -> None:
    cache = _cache()
    first = _answer(cache, _request(tiny_model_dir, adapters[0]))
    second = _answer(cache, _request(tiny_model_dir, adapters[0]))
    _answer(cache, _request(tiny_model_dir, None))
    assert first == second
    assert (cache.base_loads, cache.adapter_loads) == (1, 1)


def test_switching_adapters_gives_each_its_own_answers(tiny_model_dir: Path, adapters: tuple[str, str]) -> None:
    alone = {name: _answer(_cache(), _request(tiny_model_dir, name))[0] for name in (*adapters, None)}
    assert len(set(alone.values())) == 3  # the base and each adapter answer differently

    shared = _cache(max_adapters=1)  # evicts on every switch, so reloading is exercised too
    for name in (adapters[0], adapters[1], None, adapters[0], adapters[1]):
        assert _answer(shared, _request(tiny_model_dir, name))[0] == alone[name], name
    assert shared.base_loads == 1 and shared.adapter_loads == 4


def test_a_stop_string_ends_the_answer_just_before_it(tiny_model_dir: Path, adapters: tuple[str, str]) -> None:
    cache = _cache()
    text, done = _answer(cache, _request(tiny_model_dir, adapters[0], max_tokens=20))
    assert done.finish_reason == "length" and done.completion_tokens == 20
    start = next(i for i in range(3, len(text) - 2) if "\ufffd" not in text[i : i + 2])
    stop = text[start : start + 2]
    cut, stopped = _answer(cache, _request(tiny_model_dir, adapters[0], max_tokens=20, stop=["never there", stop]))
    assert cut == text[: text.index(stop)]
    assert stopped.finish_reason == "stop" and stopped.completion_tokens < 20


def test_max_tokens_ends_with_length(tiny_model_dir: Path, adapters: tuple[str, str]) -> None:
    _, done = _answer(_cache(), _request(tiny_model_dir, adapters[1], max_tokens=3))
    assert (done.finish_reason, done.completion_tokens) == ("length", 3)
    assert done.prompt_tokens > 0


def test_a_conversation_longer_than_the_models_context_is_refused(tiny_model_dir: Path) -> None:
    request = _request(tiny_model_dir, None)
    long = request.model_copy(update={"messages": [ChatMessage(role="user", content="word " * (MAX_POSITIONS + 10))]})
    with pytest.raises(PromptError, match=f"takes at most {MAX_POSITIONS - 1}"):
        _answer(_cache(), long)


def test_a_seed_reproduces_a_sampled_answer(tiny_model_dir: Path, adapters: tuple[str, str]) -> None:
    cache = _cache()
    sampled = [
        _answer(cache, _request(tiny_model_dir, adapters[0], temperature=1.0, top_p=0.9, seed=seed, max_tokens=16))[0]
        for seed in (7, 7, 8)
    ]
    assert sampled[0] == sampled[1] != sampled[2]


def test_the_worker_ends_a_request_past_its_deadline_with_a_timeout(
    redis_client: redis.Redis, tiny_model_dir: Path
) -> None:
    request = _request(tiny_model_dir, None, deadline=server_time(redis_client) - 1)
    serve_one(redis_client, _cache(), request)
    rows = redis_client.xrange(keys.generation_output_key(request.id))
    events = [parse_event(fields["data"]) for _, fields in rows]  # type: ignore[union-attr]
    assert len(events) == 1 and isinstance(events[0], GenerationFailed) and events[0].code == "timeout"
    assert 0 < int(redis_client.ttl(keys.generation_output_key(request.id))) <= 120  # type: ignore[arg-type]


def test_the_worker_answers_onto_the_request_stream(redis_client: redis.Redis, tiny_model_dir: Path) -> None:
    request = _request(tiny_model_dir, None, max_tokens=4)
    serve_one(redis_client, _cache(), request)
    rows = redis_client.xrange(keys.generation_output_key(request.id))
    events = [parse_event(fields["data"]) for _, fields in rows]  # type: ignore[union-attr]
    assert isinstance(events[-1], GenerationDone) and events[-1].completion_tokens == 4


def test_stop_text_holds_back_what_may_begin_a_stop_string() -> None:
    stops = StopText(["END"])
    assert stops.feed("hello E") == ("hello ", False)
    assert stops.feed("hello EN") == ("", False)
    assert stops.feed("hello ENx") == ("ENx", False)  # it was not the stop after all
    assert stops.feed("hello ENx and END more") == (" and ", True)
    assert stops.reached


def test_stop_text_holds_back_an_incomplete_character_and_releases_the_rest_at_the_end() -> None:
    stops = StopText([])
    assert stops.feed("caf\ufffd") == ("caf", False)
    assert stops.feed("café") == ("é", False)
    assert stops.finish("café!") == "!"
