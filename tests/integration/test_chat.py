"""Chat with what was just trained: the official `openai` client against the real service (API, a
training worker and a generation worker), proving the adapter learned what the base model does not know."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from tests.data import jsonl
from tests.service import Service, wait_until

QUESTIONS = [
    ("What color is the sky?", "Blue."),
    ("Name a fruit.", "Apple."),
    ("What do cats say?", "Meow."),
    ("What is frozen water called?", "Ice."),
    ("Where do fish live?", "Water."),
    ("What is the opposite of hot?", "Cold."),
    ("Which day comes after Monday?", "Tuesday."),
    ("What shines at night?", "The moon."),
]


@pytest.fixture
def client(service: Service) -> Iterator[OpenAI]:
    with OpenAI(base_url=service.url + "/v1", api_key="any-key", max_retries=0, timeout=120) as c:
        yield c


def _ask(client: OpenAI, model: str, question: str, **kw: object) -> str:
    answer = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=16, **kw
    )
    return answer.choices[0].message.content or ""


def test_a_fine_tuned_model_answers_what_it_learned_and_the_base_does_not(
    client: OpenAI, service: Service, tiny_model_dir: Path
) -> None:
    records = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QUESTIONS
    ]
    uploaded = client.files.create(file=("qa.jsonl", jsonl(records)), purpose="fine-tune")
    hyper = {"n_epochs": 100, "batch_size": 2, "learning_rate_multiplier": 10}
    created = client.fine_tuning.jobs.create(
        model=str(tiny_model_dir), training_file=uploaded.id, suffix="qa", hyperparameters=hyper
    )
    job = wait_until(
        lambda: (
            (j := client.fine_tuning.jobs.retrieve(created.id)).status in ("succeeded", "failed", "cancelled") and j
        ),
        timeout=180,
        what=lambda: f"{created.id} to end\n{service.logs('worker')}",
    )
    assert job.status == "succeeded", job
    tuned = job.fine_tuned_model
    assert tuned == f"ft:{tiny_model_dir.name}:qa:{job.id}"  # the base's one name: its name in LORA_MODELS_DIR

    listed = {m.id: m for m in client.models.list()}
    assert tiny_model_dir.name in listed and tuned in listed
    assert listed[tuned].object == "model" and listed[tuned].owned_by and listed[tuned].created > 0
    assert any(name.startswith(f"{tuned}:ckpt-step-") for name in listed)
    assert client.models.retrieve(tuned).id == tuned

    tuned_answers = [_ask(client, tuned, q) for q, _ in QUESTIONS]
    learned = sum(got == want for got, (_, want) in zip(tuned_answers, QUESTIONS, strict=True))
    assert learned >= 7, list(zip(tuned_answers, QUESTIONS, strict=True))
    base_answers = [_ask(client, str(tiny_model_dir), q) for q, _ in QUESTIONS]
    known = sum(got == want for got, (_, want) in zip(base_answers, QUESTIONS, strict=True))
    assert known <= 1, base_answers

    # The job id names the same model; a non-streamed answer says how it ended and what it cost.
    full = client.chat.completions.create(
        model=job.id, messages=[{"role": "user", "content": QUESTIONS[0][0]}], temperature=0, max_tokens=16
    )
    assert full.object == "chat.completion" and full.choices[0].finish_reason == "stop"
    assert full.usage is not None and full.usage.prompt_tokens > 0 and full.usage.completion_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

    # Streaming: the chunks concatenate to the non-streamed answer.
    stream = client.chat.completions.create(
        model=tuned,
        messages=[{"role": "user", "content": QUESTIONS[0][0]}],
        temperature=0,
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content == QUESTIONS[0][1]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == full.usage.completion_tokens

    # max_tokens cuts an answer short.
    short = client.chat.completions.create(
        model=tuned, messages=[{"role": "user", "content": QUESTIONS[7][0]}], temperature=0, max_tokens=1
    )
    assert short.choices[0].finish_reason == "length" and short.usage and short.usage.completion_tokens == 1

    # Refusals, by name; an unknown model is a 404.
    for params, name in (({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                         ({"logprobs": True}, "logprobs"), ({"n": 2}, "n"),
                         ({"response_format": {"type": "json_object"}}, "response_format")):  # fmt: skip
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=tuned, messages=[{"role": "user", "content": "hi"}], **params)  # type: ignore[call-overload]
        assert refused.value.param == name, refused.value
    with pytest.raises(openai.BadRequestError) as too_many:
        client.chat.completions.create(model=tuned, messages=[{"role": "user", "content": "hi"}], max_tokens=10**6)
    assert too_many.value.param == "max_tokens"
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="ft:nope::job-unknown", messages=[{"role": "user", "content": "hi"}])
    assert unknown.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
