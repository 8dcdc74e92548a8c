"""A run's phases: setup loads and tokenizes, train reports and checkpoints, save writes the adapter."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from shared.config import TrainConfig
from shared.events import event_type
from tests.data import easy_records
from worker.training.run import TrainingRun
from worker.training.run_io import LocalControl, RunPaths


def test_setup_train_save(tiny_model_dir: Path, tmp_path: Path) -> None:
    events: list[tuple[str, str, dict[str, Any]]] = []  # (type, message, payload)
    config = TrainConfig(
        model_name=str(tiny_model_dir), epochs=2, batch_size=4, learning_rate=1e-2, validation_split=0.2
    )
    run = TrainingRun(
        config,
        easy_records(10),
        RunPaths(tmp_path / "adapter", checkpoints=tmp_path / "checkpoints", results=tmp_path / "step_metrics.csv"),
        control=LocalControl(on_event=lambda event, message: events.append((event_type(event), message,
                                                                            event.model_dump()))),
    )  # fmt: skip
    run.setup()
    assert (len(run.examples), len(run.held_out), run.engine) == (8, 2, "fast")
    assert not (tmp_path / "adapter").exists()
    result = run.train()
    assert (result.steps, result.total_steps, result.stopped) == (4, 4, False)
    assert [epoch for epoch, _ in result.eval_losses] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    meta = json.loads((tmp_path / "checkpoints" / "step-000004" / "checkpoint.json").read_text())
    assert (meta["step"], meta["epoch"]) == (4, 2) and meta["full_valid_loss"] == result.eval_losses[-1][1]
    for name in ("train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy",
                 "full_valid_mean_token_accuracy"):  # fmt: skip
        assert isinstance(meta[name], float), name
    assert 0.0 <= meta["train_mean_token_accuracy"] <= 1.0 and 0.0 <= meta["full_valid_mean_token_accuracy"] <= 1.0
    logged = [payload for kind, _, payload in events if kind == "metrics"]
    assert all(m["accuracy"] is not None and m["valid_loss"] is not None for m in logged)
    rows = list(csv.DictReader((tmp_path / "step_metrics.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert [float(r["train_accuracy"]) for r in rows] == [m["accuracy"] for m in logged]
    assert all(r["valid_loss"] and r["valid_mean_token_accuracy"] for r in rows)
    kinds = [kind for kind, _, _ in events]
    assert kinds.count("epoch") == 2 and kinds.count("metrics") == 4 and kinds.count("checkpoint") == 2
    run.save(result)
    assert result.output_dir == tmp_path / "adapter"
    summary = json.loads((tmp_path / "adapter" / "training_summary.json").read_text())
    assert summary["steps"] == 4 and summary["config"]["epochs"] == 2
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
