"""User paths stay inside base_path; a base model named by its folder there is loaded from it, else by its name."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.paths import PathOutsideBaseError, model_location, resolve_inside


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


@pytest.mark.parametrize("bad", ["../escape", "/etc", "a/../../b", ".", ""])
def test_paths_outside_base_are_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(PathOutsideBaseError):
        resolve_inside(tmp_path, bad)


def test_symlink_out_of_base_is_refused(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to("/tmp")
    with pytest.raises(PathOutsideBaseError):
        resolve_inside(tmp_path, "link/x")


def test_paths_inside_base_resolve(tmp_path: Path) -> None:
    assert resolve_inside(tmp_path, "a/b") == (tmp_path / "a" / "b").resolve()
    assert resolve_inside(tmp_path, str(tmp_path / "c")) == (tmp_path / "c").resolve()
