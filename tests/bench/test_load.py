"""bench.load's pieces that need no service: which configurations it runs, and which steps fall in a window."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.base_models import check_base_model
from bench.load import Config, Job, _parse, configs, default_torch_threads, models_dir, service_env
from shared.settings import Settings


def test_both_configurations_by_default_and_one_on_request() -> None:
    default = default_torch_threads()
    assert configs(_parse([])) == [Config("budget", None), Config("torch default", default)]
    assert configs(_parse(["--no-budget"])) == [Config("torch default", default)]
    assert configs(_parse(["--threads", "3"])) == [Config("threads=3", 3)]


def test_a_window_takes_the_steps_that_ended_in_it() -> None:
    job = Job("http://127.0.0.1:1", "job-1")
    job.events = [
        {"type": "info", "created_at": 9.0, "data": {"torch_threads": 1}},
        {"type": "metrics", "created_at": 9.5, "data": {"step_seconds": 0.5}},
        {"type": "metrics", "created_at": 10.0, "data": {"step_seconds": 0.01}},
        {"type": "metrics", "created_at": 11.0, "data": {"step_seconds": 0.02}},
        {"type": "epoch", "created_at": 11.5, "data": {}},
        {"type": "metrics", "created_at": 12.5, "data": {"step_seconds": 0.9}},
    ]
    assert job.step_seconds(10.0, 12.0) == [0.01, 0.02]
    assert job.torch_threads() == 1


def test_the_service_it_starts_accepts_the_model_it_builds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The benchmark's job names its tiny model by absolute path: the service must find it in a models directory.
    base = tmp_path / "base-budget"
    model = models_dir(tmp_path) / "tiny_model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    for key, value in service_env(Config("budget", None), base).items():
        if key.startswith("LORA_"):
            monkeypatch.setenv(key, value)
    accepted = check_base_model(Settings(), str(model))
    assert accepted.is_folder and accepted.location == str(model.resolve())
