"""DPO through both surfaces in process: preference files validated line by line and kept as their own
kind, `method=dpo` mapped onto the config and shown back, and a method refused on the other kind of data."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI

from api.openai.store import OpenAIStore
from shared.store import JobStore
from tests.data import easy_records, jsonl, preference_records


@pytest.fixture
def client(api: TestClient) -> Iterator[OpenAI]:
    with OpenAI(base_url="http://testserver/v1", api_key="any", max_retries=0, http_client=api) as c:
        yield c


def _upload(client: OpenAI, records: list[dict[str, Any]]) -> str:
    return client.files.create(file=("d.jsonl", jsonl(records)), purpose="fine-tune").id


def _message(error: openai.BadRequestError) -> str:
    """The server's own message (the client's `message` puts the status code first)."""
    assert isinstance(error.body, dict)
    return str(error.body["message"])


def _refused_upload(client: OpenAI, data: bytes) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as refused:
        client.files.create(file=("d.jsonl", data), purpose="fine-tune")
    assert (refused.value.param, refused.value.code) == ("file", "invalid_file_format")
    return refused.value


def test_preference_records_are_checked_line_by_line(client: OpenAI, redis_client: Any) -> None:
    good = preference_records(1)[0]
    bad_lines = [
        {**good, "preferred_output": []},
        {**good, "non_preferred_output": [{"role": "user", "content": "no"}]},
        {**good, "input": {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}},
        {**good, "non_preferred_output": good["preferred_output"]},
        {"preferred_output": good["preferred_output"]},
        {**good, "input": {"messages": []}},
    ]
    error = _refused_upload(client, jsonl([good, *bad_lines]))
    assert _message(error) == (
        "invalid dataset: line 2: 'preferred_output' must be a list of exactly one assistant message; "
        "line 3: non_preferred_output[0].role is 'user': an output is an assistant message; "
        "line 4: input.messages[1].role is 'assistant': the input must end with a user (or tool) message, which "
        "the outputs answer; "
        "line 5: preferred_output and non_preferred_output are the same: there is no preference to learn; "
        "line 6: a preference record needs 'input', 'preferred_output', 'non_preferred_output'; missing "
        "['input', 'non_preferred_output']; "
        "line 7: 'input.messages' must be a non-empty list"
    )
    file_id = _upload(client, preference_records(3))
    stored = OpenAIStore(redis_client).get_file(file_id)
    assert stored is not None and (stored.kind, stored.num_records) == ("preference", 3)
    assert client.files.content(file_id).content == jsonl(preference_records(3))  # already normalised


def test_a_file_holds_one_kind_and_the_first_line_of_the_other_is_named(client: OpenAI) -> None:
    chat, pref = easy_records(3), preference_records(3)
    error = _refused_upload(client, jsonl([*pref[:2], chat[0], pref[2], chat[1]]))
    assert _message(error).startswith(
        "invalid dataset: line 3: a chat record, but the file's first record (line 1) is a preference record"
    )
    assert "line 5" not in _message(error)  # one mixed-kind problem, not one per line
    error = _refused_upload(client, jsonl([chat[0], pref[0]]))
    assert _message(error).startswith(
        "invalid dataset: line 2: a preference record, but the file's first record (line 1) is a chat record"
    )


def test_a_dpo_job_maps_its_hyperparameters_and_shows_its_method(client: OpenAI, store: JobStore) -> None:
    file_id = _upload(client, preference_records(4))
    hyper = {"beta": 0.25, "n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 3}
    created = client.fine_tuning.jobs.create(
        model="some/model", training_file=file_id, validation_file=file_id,
        method={"type": "dpo", "dpo": {"hyperparameters": hyper}},
    )  # fmt: skip
    assert created.method is not None and created.method.type == "dpo" and created.method.supervised is None
    assert created.method.dpo is not None and created.method.dpo.hyperparameters is not None
    assert created.method.dpo.hyperparameters.model_dump() == {**hyper, "learning_rate_multiplier": 3.0}
    assert created.hyperparameters.model_dump() == {"n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 3.0}
    record = store.get(created.id)
    assert record is not None
    config = record.config
    assert (config.method, config.dpo_beta, config.epochs, config.batch_size) == ("dpo", 0.25, 2, 2)
    assert config.learning_rate == pytest.approx(9e-4)
    assert client.fine_tuning.jobs.retrieve(created.id).method == created.method
    client.fine_tuning.jobs.cancel(created.id)

    auto = client.fine_tuning.jobs.create(
        model="some/model", training_file=file_id, method={"type": "dpo", "dpo": {"hyperparameters": {"beta": "auto"}}}
    )
    assert auto.method is not None and auto.method.dpo is not None and auto.method.dpo.hyperparameters is not None
    assert auto.method.dpo.hyperparameters.beta == 0.1
    auto_record = store.get(auto.id)
    assert auto_record is not None and auto_record.config.dpo_beta == 0.1
    client.fine_tuning.jobs.cancel(auto.id)


def test_the_method_must_match_the_files_kind(client: OpenAI, store: JobStore) -> None:
    chat_id, pref_id = _upload(client, easy_records(2)), _upload(client, preference_records(2))
    cases = [
        ({"training_file": chat_id, "method": {"type": "dpo"}}, "training_file", "holds chat records"),
        ({"training_file": pref_id, "method": {"type": "supervised"}}, "training_file", "holds preference records"),
        ({"training_file": pref_id}, "training_file", "supervised training needs chat records"),
        ({"training_file": pref_id, "validation_file": chat_id, "method": {"type": "dpo"}}, "validation_file",
         "dpo training needs preference records"),
        ({"training_file": pref_id, "method": {"type": "dpo", "supervised": {}}}, "method.supervised",
         "method.type is 'dpo'"),
        ({"training_file": pref_id, "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}},
         "method.dpo.hyperparameters.beta", "greater than 0"),
    ]  # fmt: skip
    for kwargs, param, says in cases:
        with pytest.raises(openai.BadRequestError) as refused:
            client.fine_tuning.jobs.create(model="some/model", **kwargs)
        assert refused.value.param == param and says in _message(refused.value), (kwargs, _message(refused.value))
    with pytest.raises(openai.BadRequestError) as rft:
        client.fine_tuning.jobs.create(model="some/model", training_file=pref_id, method={"type": "reinforcement"})
    assert (rft.value.param, rft.value.code) == ("method.type", "unsupported_method")
    assert _message(rft.value) == "reinforcement fine-tuning is not supported; use supervised or dpo"
    assert client.fine_tuning.jobs.list().data == [] and store.current() is None


def test_post_train_takes_method_dpo_with_preference_data_only(api: TestClient, store: JobStore) -> None:
    def train(config: dict[str, Any], data: bytes) -> Any:
        return api.post("/train", files={"config": (None, json.dumps(config)), "file": ("d.jsonl", data)})

    refused = train({"method": "dpo"}, jsonl(easy_records(2)))
    assert refused.status_code == 422
    assert refused.json()["errors"][0]["loc"] == ["file"] and "holds chat records" in refused.text
    refused = train({}, jsonl(preference_records(2)))
    assert refused.status_code == 422 and "supervised training needs chat records" in refused.text
    accepted = train({"method": "dpo", "dpo_beta": 0.5, "epochs": 1}, jsonl(preference_records(2)))
    assert accepted.status_code == 202, accepted.text
    record = store.get(accepted.json()["job_id"])
    assert record is not None and (record.config.method, record.config.dpo_beta) == ("dpo", 0.5)
