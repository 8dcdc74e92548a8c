"""What adapters, checkpoints and merged models record as their base (worker.training.base_name): a name that
finds the base from any working directory, on any host: the hub id for a hub model, else an absolute path.
Trained in process on the tiny model, named relatively, by its cache snapshot and by a hub id."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.data import easy_records
from tests.fixtures.hub_cache import add_cached_model
from worker.training.base_name import recorded_base


def _base_of(folder: Path) -> str:
    return str(json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"])


def test_a_folder_is_recorded_by_its_absolute_path_and_a_hub_id_as_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    absolute = str((tmp_path / "models" / "tiny").resolve())
    for name in ("./models/tiny", "models/tiny/", "models/../models/tiny", absolute):
        assert recorded_base(name) == absolute, name
    assert recorded_base("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    snapshot = add_cached_model(tmp_path / "hub", "Qwen/Qwen2.5-0.5B")  # loaded from its cache snapshot
    assert recorded_base(str(snapshot)) == "Qwen/Qwen2.5-0.5B"


def test_a_relatively_named_base_is_recorded_absolute_in_the_adapter_checkpoints_continuation_and_merge(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.training import RunPaths, TrainConfig, merge_model, train_model

    work = tmp_path / "work"
    shutil.copytree(tiny_model_dir, work / "models" / "tiny")
    monkeypatch.chdir(work)  # the user's "./models/tiny" only means something from here
    absolute = str((work / "models" / "tiny").resolve())
    config = TrainConfig(model_name="./models/tiny", epochs=1, batch_size=4, keep_checkpoints=1)
    paths = RunPaths(output=tmp_path / "adapter", checkpoints=tmp_path / "checkpoints")
    train_model(config, easy_records(8), paths=paths)
    (checkpoint,) = (tmp_path / "checkpoints").iterdir()
    assert _base_of(tmp_path / "adapter") == _base_of(checkpoint) == absolute

    # An adapter that recorded a relative base (as one trained before this fix did), continued from elsewhere.
    adapter_config = tmp_path / "adapter" / "adapter_config.json"
    adapter_config.write_text(json.dumps({**json.loads(adapter_config.read_text()), "base_model_name_or_path": "x"}))
    continued = config.model_copy(update={"lora_path": str(tmp_path / "adapter")})
    train_model(continued, easy_records(8), output_dir=tmp_path / "continued")
    assert _base_of(tmp_path / "continued") == absolute

    monkeypatch.chdir(tmp_path)  # elsewhere: the adapter alone finds its base
    merged = merge_model(tmp_path / "continued", tmp_path / "merged")
    assert isinstance(merged, Path)
    assert json.loads((merged / "merge_summary.json").read_text())["base_model"] == absolute
    saved = json.loads((merged / "config.json").read_text()).get("_name_or_path")
    assert saved in (None, absolute)


def test_a_hub_model_is_recorded_by_its_hub_id_not_its_cache_path(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    from worker.training import TrainConfig, train_model

    cache = tmp_path / "hf-hub-cache"
    snapshot = add_cached_model(cache, "tiny-org/tiny")
    for item in tiny_model_dir.iterdir():  # the whole model, as a download leaves it
        if item.is_file():
            shutil.copy(item, snapshot / item.name)
    # transformers reads the cache and offline mode from huggingface_hub's constants when it loads.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    for name, output in [("tiny-org/tiny", "by-id"), (str(snapshot), "by-snapshot")]:
        train_model(TrainConfig(model_name=name, epochs=1, batch_size=8), easy_records(8), output_dir=output)
        assert _base_of(tmp_path / output) == "tiny-org/tiny", name
    assert os.path.isdir(snapshot)
