"""Where a worker loads a base model from: a model folder under base_path by its name, else the name itself."""

from __future__ import annotations

from pathlib import Path

from shared.paths import model_location


def test_a_model_folder_under_base_path_is_found_by_its_name(tmp_path: Path) -> None:
    (tmp_path / "org" / "my-model").mkdir(parents=True)
    (tmp_path / "org" / "my-model" / "config.json").write_text("{}")
    assert model_location(tmp_path, "org/my-model") == str((tmp_path / "org" / "my-model").resolve())


def test_anything_else_is_left_as_named(tmp_path: Path) -> None:
    (tmp_path / "not-a-model").mkdir()  # a folder without a model's config.json
    assert model_location(tmp_path, "Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert model_location(tmp_path, "not-a-model") == "not-a-model"
    assert model_location(tmp_path, "../../etc") == "../../etc"  # never a folder outside base_path
    assert model_location(tmp_path, "/abs/elsewhere") == "/abs/elsewhere"
