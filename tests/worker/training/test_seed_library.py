"""The seed's library calls, written as a seed user wrote them, and what the service will not overwrite."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from shared.config import TrainConfig
from shared.outputs import OUTPUT_MARKER, DestinationInUse
from worker.training import merge_model, train_model


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def query_response_to_messages(record: dict[str, Any]) -> dict[str, Any]:
    """What the seed's example did with its query/response data before training."""
    return {
        "messages": [{"role": "user", "content": record["query"]}, {"role": "assistant", "content": record["response"]}]
    }


def write_seed_project(base_path: Path) -> Path:
    base_path.mkdir()
    (base_path / "fine_tune.py").write_text("# the user's own script\n")
    raw = [{"query": f"Who are you? ({i})", "response": "I am Kylis, made by Erwin."} for i in range(6)]
    (base_path / "self_cognition.jsonl").write_text("".join(json.dumps(r) + "\n" for r in raw))
    processed = base_path / "self_cognition_processed.jsonl"
    processed.write_text("".join(json.dumps(query_response_to_messages(r), ensure_ascii=False) + "\n" for r in raw))
    return processed


def test_the_seed_example_flow(tiny_model_dir: Path, tmp_path: Path) -> None:
    base_path = tmp_path / "project"
    data_path = write_seed_project(base_path)
    before = snapshot(base_path)
    train_config = TrainConfig()
    train_config.model_name = str(tiny_model_dir)
    train_config.attn_implementation = "flash_attention_2"
    train_config.tokenizer_padding_side = "left"
    train_config.epochs = 2
    with pytest.raises(ValueError, match="epochs"):
        train_config.epochs = 0  # validated on assignment
    result = train_model(train_config, str(data_path), str(base_path))
    adapter = base_path / "lora_finetuned"
    assert result.output_dir == adapter and (adapter / "adapter_config.json").is_file()
    after = snapshot(base_path)
    assert {k: v for k, v in after.items() if not k.startswith("lora_finetuned/")} == before
    assert sorted(p.name for p in base_path.iterdir()) == sorted([*(Path(k).name for k in before), "lora_finetuned"])

    merged, tokenizer = merge_model(str(tiny_model_dir), str(adapter), str(tmp_path / "merged"))
    assert (tmp_path / "merged" / "config.json").is_file() and merged.config.vocab_size > 0
    assert tokenizer("hi")["input_ids"]


def test_relative_and_absolute_model_save_path(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = TrainConfig(model_name=str(tiny_model_dir), epochs=1, model_save_path="runs/first")
    records = [query_response_to_messages({"query": "Q?", "response": "A."})] * 2
    assert train_model(config, records, tmp_path).output_dir == tmp_path / "runs" / "first"
    config.model_save_path = str(tmp_path / "elsewhere")
    assert train_model(config, records, tmp_path / "ignored").output_dir == tmp_path / "elsewhere"


def test_seed_config_values_as_people_send_them() -> None:
    config = TrainConfig.model_validate(
        {"epochs": "3", "batch_size": 4.0, "train_round": 2, "lora_modules_to_save": None, "response_template": None}
    )
    assert (config.epochs, config.batch_size, config.train_round) == (3, 4, 2)
    assert config.lora_modules_to_save == [] and config.response_template is None
    for bad in ({"epochs": True}, {"learning_rate": "nan"}, {"epochs": 2.5}, {"unknown_field": 1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig.model_validate(bad)


@pytest.mark.parametrize("kind", ["base model", "user folder"])
def test_a_folder_the_service_did_not_write_is_never_replaced(kind: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "Qwen2.5-0.5B"
    target.mkdir()
    if kind == "base model":
        for file in tiny_model_dir.iterdir():
            (target / file.name).write_bytes(file.read_bytes())
    else:
        (target / "notes.txt").write_text("mine")
    before = snapshot(target)
    config = TrainConfig(model_name=str(tiny_model_dir), epochs=1, model_save_path="Qwen2.5-0.5B")
    records = [query_response_to_messages({"query": "Q?", "response": "A."})] * 2
    with pytest.raises(DestinationInUse, match="holds files this service did not write"):
        train_model(config, records, tmp_path)
    assert snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Qwen2.5-0.5B"]  # no staging folder left behind


def test_a_previous_adapter_and_an_empty_folder_may_be_replaced(tiny_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "lora_finetuned").mkdir()  # empty: fine
    config = TrainConfig(model_name=str(tiny_model_dir), epochs=1)
    records = [query_response_to_messages({"query": "Q?", "response": "A."})] * 2
    first = train_model(config, records, tmp_path).output_dir
    assert first is not None and (first / OUTPUT_MARKER).is_file()
    marker = json.loads((first / OUTPUT_MARKER).read_text())
    assert marker["kind"] == "adapter" and marker["written_by"] == "lora-server"
    config.epochs = 2
    second = train_model(config, records, tmp_path)
    assert second.output_dir == first and json.loads((first / "training_summary.json").read_text())["steps"] == 2
    with pytest.raises(DestinationInUse):  # and a merge never overwrites the base model's folder either
        merge_model(first, tiny_model_dir)
