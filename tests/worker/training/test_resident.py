"""The base kept loaded between runs: reused for the same load, restored exactly, reloaded otherwise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from shared.config import TrainConfig
from shared.events import EventPayload
from shared.jobs import Progress
from tests.data import easy_records
from worker.training import LocalControl, train_model
from worker.training.base_snapshot import problems
from worker.training.model_loading import prepare_model
from worker.training.resident import ResidentBase

CPU = torch.device("cpu")


def _config(model_dir: Path, **overrides: Any) -> TrainConfig:
    # Dropout on, lm_head and embed_tokens trained in full (the seed's default): every kind of state
    # a run puts on the base, and RNG use after the load, must not leak into the next run.
    options: dict[str, Any] = dict(model_name=str(model_dir), epochs=2, batch_size=4, learning_rate=1e-2,
                                   lora_dropout=0.1, seed=7)  # fmt: skip
    return TrainConfig(**{**options, **overrides})


def _train(config: TrainConfig, out: Path, resident: ResidentBase | None) -> list[dict[str, Any]]:
    """Train and save an adapter; the run's info events about its base."""
    seen: list[dict[str, Any]] = []

    def on_event(event: EventPayload, message: str) -> None:
        data = event.model_dump()
        if "base_model" in data:
            seen.append({**data, "message": message})

    train_model(config, easy_records(8), output_dir=out, control=LocalControl(on_event=on_event), resident=resident)
    return seen


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def test_a_second_run_reuses_the_base_and_saves_what_a_fresh_load_would(tiny_model_dir: Path, tmp_path: Path) -> None:
    resident = ResidentBase()
    first = _train(_config(tiny_model_dir), tmp_path / "first", resident)
    assert resident._resident is not None
    base = resident._resident.model
    second = _train(_config(tiny_model_dir), tmp_path / "second", resident)
    fresh = _train(_config(tiny_model_dir), tmp_path / "fresh", None)

    assert [e["base_model"] for e in first + second + fresh] == ["loaded", "reused", "loaded"]
    assert first[0]["reason"] == "first job on this worker" and second[0]["reason"] is None
    assert "compile cache at" in second[0]["message"] and second[0]["fx_graph_cache"] is True
    assert resident._resident is not None and resident._resident.model is base  # the same object, not a reload
    reused, loaded = _adapter(tmp_path / "second"), _adapter(tmp_path / "fresh")
    assert reused.keys() == loaded.keys() and any("embed_tokens" in k for k in reused)
    for name, tensor in loaded.items():
        torch.testing.assert_close(reused[name], tensor, rtol=0, atol=0, msg=name)
    assert not problems(base, resident._resident.snapshot)


def test_another_model_or_dtype_reloads(tiny_model_dir: Path, tmp_path: Path) -> None:
    resident = ResidentBase()
    _train(_config(tiny_model_dir, epochs=1), tmp_path / "a", resident)
    (event,) = _train(_config(tiny_model_dir, epochs=1, model_load_torch_dtype="bfloat16"), tmp_path / "b", resident)
    assert event["base_model"] == "loaded"
    assert event["reason"] == "the previous job used the same model with another dtype torch.float32"
    assert resident.plan is not None and resident.plan.dtype == torch.bfloat16
    other = tmp_path / "other-model"
    other.symlink_to(tiny_model_dir, target_is_directory=True)  # another name: another model, as far as the key goes
    (event,) = _train(_config(other, epochs=1), tmp_path / "c", resident)
    assert event["base_model"] == "loaded" and event["reason"].startswith("the previous job used another model")


def test_a_base_left_with_adapter_modules_is_dropped_and_reloaded(tiny_model_dir: Path, tmp_path: Path) -> None:
    resident = ResidentBase()
    config = _config(tiny_model_dir, epochs=1)
    got = resident.acquire(config, CPU)
    prepare_model(got.model, config)
    # As if restoring had silently missed something: the snapshot no longer describes the LoRA'd tree.
    assert resident._resident is not None
    resident._resident.snapshot.modules.clear()
    resident.release()
    assert resident._resident is None
    (event,) = _train(config, tmp_path / "after", resident)
    assert event["base_model"] == "loaded" and "failed its check" in event["reason"]
    assert "adapter modules left in the base" in event["reason"]


def test_changed_base_weights_are_detected(tiny_model_dir: Path) -> None:
    resident = ResidentBase()
    got = resident.acquire(_config(tiny_model_dir), CPU)
    with torch.no_grad():
        next(got.model.parameters()).add_(1e-3)  # e.g. an adapter merged into the base
    resident.release()
    assert resident._resident is None and resident._dropped is not None
    assert "values changed" in resident._dropped


def test_failed_and_stopped_runs_give_the_base_back_clean(tiny_model_dir: Path, tmp_path: Path) -> None:
    resident = ResidentBase()
    config = _config(tiny_model_dir, epochs=3)

    def fail_at_step_2(progress: Progress) -> None:
        if progress.current_step == 2:
            raise RuntimeError("the step failed")

    with pytest.raises(RuntimeError, match="the step failed"):
        train_model(config, easy_records(8), output_dir=tmp_path / "failed", resident=resident,
                    control=LocalControl(on_progress=fail_at_step_2))  # fmt: skip
    assert resident._resident is not None and not resident._resident.in_use
    steps: list[int] = []
    stopped = train_model(config, easy_records(8), output_dir=tmp_path / "cancelled", resident=resident,
                          control=LocalControl(on_progress=lambda p: steps.append(p.current_step),
                                               stop=lambda: len(steps) >= 2))  # fmt: skip
    assert stopped.stopped and resident._resident is not None and not resident._resident.in_use
    (event,) = _train(config, tmp_path / "again", resident)
    assert event["base_model"] == "reused"
    fresh = tmp_path / "fresh"
    _train(config, fresh, None)
    for name, tensor in _adapter(fresh).items():
        torch.testing.assert_close(_adapter(tmp_path / "again")[name], tensor, rtol=0, atol=0, msg=name)


def test_settle_keeps_the_base_unless_memory_grew(tiny_model_dir: Path, tmp_path: Path) -> None:
    resident = ResidentBase()
    _train(_config(tiny_model_dir, epochs=1), tmp_path / "a", resident)
    assert resident.settle(max_rss_growth_bytes=2**30) is None  # sets the baseline
    assert resident._resident is not None and resident._resident.rss_baseline is not None
    hog = bytearray(64 * 2**20)  # 64 MiB of host memory the "job" kept
    hog[::4096] = b"x" * len(hog[::4096])
    reason = resident.settle(max_rss_growth_bytes=16 * 2**20)
    assert reason is not None and "host memory grew" in reason
    assert resident._resident is None
    del hog
