"""The generation worker's side of Tinker sampling: a SampleOp's future settled in Redis with its samples or
its error, by `serve_sample` in process and by a running `python -m worker.generation` taking it off
keys.TINKER_SAMPLE_QUEUE alongside chat requests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch
from transformers import AutoTokenizer

from shared import keys, tinker_store
from shared.generation import ChatMessage, GenerationDone, GenerationRequest, SamplingSpec, parse_event
from shared.generation_queue import server_time
from shared.tinker_ops import SampleOp, SampleResult
from shared.tinker_store import Future
from tests.service import Service, wait_until
from worker.generation.model_cache import ModelCache
from worker.generation.server import serve_sample


@pytest.fixture(scope="module")
def prompt(tiny_model_dir: Path) -> list[int]:
    ids: list[int] = AutoTokenizer.from_pretrained(str(tiny_model_dir))("What is two plus two?")["input_ids"]
    return ids


def _cache() -> ModelCache:
    return ModelCache(max_bases=1, max_adapters=2, device=torch.device("cpu"))


def _op(request_id: str, model_dir: Path, prompt: list[int], **params: object) -> SampleOp:
    return SampleOp.model_validate({"request_id": request_id, "model_dir": str(model_dir), "prompt": prompt, **params})


def _settled(client: redis.Redis, request_id: str) -> Future:
    future = tinker_store.get_future(client, request_id)
    assert future is not None and future.state != "pending", future
    return future


def test_a_sample_settles_its_future_with_the_sequences(
    redis_client: redis.Redis, tiny_model_dir: Path, prompt: list[int]
) -> None:
    tinker_store.new_future(redis_client, "s1", None)
    op = _op("s1", tiny_model_dir, prompt, num_samples=2, max_tokens=5, stop_at_eos=False, prompt_logprobs=True,
             deadline_ms=int(server_time(redis_client) * 1000) + 60_000)  # fmt: skip
    serve_sample(redis_client, _cache(), op)
    future = _settled(redis_client, "s1")
    assert future.state == "done" and isinstance(future.result, SampleResult)
    assert [len(s.tokens) for s in future.result.sequences] == [5, 5]
    assert future.result.prompt_logprobs is not None and future.result.prompt_logprobs[0] is None


def test_a_sample_past_its_deadline_is_failed_without_running(
    redis_client: redis.Redis, tiny_model_dir: Path, prompt: list[int]
) -> None:
    cache = _cache()
    tinker_store.new_future(redis_client, "late", None)
    serve_sample(redis_client, cache, _op("late", tiny_model_dir, prompt,
                                          deadline_ms=int(server_time(redis_client) * 1000) - 1000))  # fmt: skip
    future = _settled(redis_client, "late")
    assert future.state == "failed" and "deadline passed" in (future.error or "")
    assert cache.base_loads == 0  # not run: the model was not even loaded


def test_a_token_outside_the_vocabulary_fails_the_future_as_the_users_error(
    redis_client: redis.Redis, tiny_model_dir: Path, prompt: list[int]
) -> None:
    tinker_store.new_future(redis_client, "oov", None)
    serve_sample(redis_client, _cache(), _op("oov", tiny_model_dir, [*prompt, 123456]))
    future = _settled(redis_client, "oov")
    assert (future.state, future.category) == ("failed", "user")
    assert "123456" in (future.error or "")


def test_a_base_that_cannot_load_fails_the_future_and_the_worker_goes_on(
    redis_client: redis.Redis, tiny_model_dir: Path, tmp_path: Path, prompt: list[int]
) -> None:
    cache = _cache()
    serve_sample(redis_client, cache, _op("gone", tmp_path / "no-such-model", prompt))
    assert _settled(redis_client, "gone").category == "server"
    serve_sample(redis_client, cache, _op("fine", tiny_model_dir, prompt, max_tokens=2))
    assert _settled(redis_client, "fine").state == "done"


@pytest.fixture
def generator(tmp_path: Path, redis_url: str, redis_client: redis.Redis) -> Iterator[Service]:
    """A running generation worker process (no API, no training worker), on a fresh Redis database."""
    svc = Service(base_path=tmp_path / "base", redis_url=redis_url, log_dir=tmp_path / "logs")
    svc.base_path.mkdir(parents=True)
    svc.log_dir.mkdir(parents=True)
    svc.start_generator()
    try:
        yield svc
    finally:
        svc.stop()


def test_a_running_generation_worker_serves_samples_and_chat_from_their_queues(
    generator: Service, redis_client: redis.Redis, tiny_model_dir: Path, prompt: list[int]
) -> None:
    deadline_ms = int(server_time(redis_client) * 1000) + 120_000
    ops = [
        _op("e2e-greedy", tiny_model_dir, prompt, temperature=0, max_tokens=6, num_samples=2, deadline_ms=deadline_ms),
        _op("e2e-oov", tiny_model_dir, [99_999_999], deadline_ms=deadline_ms),
        _op("e2e-late", tiny_model_dir, prompt, deadline_ms=deadline_ms - 200_000),
    ]
    for op in ops:
        tinker_store.new_future(redis_client, op.request_id, None)
        redis_client.rpush(keys.TINKER_SAMPLE_QUEUE, op.model_dump_json())
    chat = GenerationRequest(
        id="chatcmpl-e2e",
        base_model=str(tiny_model_dir),
        messages=[ChatMessage(role="user", content="hi")],
        sampling=SamplingSpec(max_tokens=3, temperature=0),
        deadline=server_time(redis_client) + 120,
    )
    redis_client.rpush(keys.GENERATE_QUEUE, chat.model_dump_json())

    def all_settled() -> list[Future] | None:
        futures = [tinker_store.get_future(redis_client, op.request_id) for op in ops]
        return [f for f in futures if f] if all(f and f.state != "pending" for f in futures) else None

    greedy, oov, late = wait_until(
        all_settled, timeout=120, gives_up=lambda: generator.generator is not None and
        generator.generator.poll() is not None, what=lambda: "the samples' futures\n" + generator.logs("generator"),
    )  # fmt: skip
    assert greedy.state == "done" and isinstance(greedy.result, SampleResult), greedy
    assert len(greedy.result.sequences) == 2 and greedy.result.sequences[0] == greedy.result.sequences[1]
    assert len(greedy.result.sequences[0].tokens) <= 6
    assert (oov.state, oov.category) == ("failed", "user") and "99999999" in (oov.error or "")
    assert late.state == "failed" and "deadline passed" in (late.error or "")

    def chat_done() -> GenerationDone | None:
        rows = redis_client.xrange(keys.generation_output_key(chat.id))
        events = [parse_event(fields["data"]) for _, fields in rows]  # type: ignore[union-attr]
        return next((e for e in events if isinstance(e, GenerationDone)), None)

    assert wait_until(chat_done, timeout=60, what=lambda: generator.logs("generator")).completion_tokens <= 3
    assert generator.generator is not None and generator.generator.poll() is None  # still serving
