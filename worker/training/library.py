"""The library entry point: fine-tune one LoRA adapter in this process (no server, no Redis).

from worker.training import train_model, TrainConfig
train_model(TrainConfig(model_name="Qwen/Qwen2.5-0.5B", epochs=1), "data.jsonl", "out/my_adapter")
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.config import TrainConfig
from shared.jobs import WandbSpec
from worker.training.merge import merge_model
from worker.training.model_loading import EventCallback, apply_lora, load_base_model, upcast_trainable
from worker.training.run import Dataset, ProgressCallback, StoppedEarly, TrainingRun, TrainResult

__all__ = [
    "TrainConfig",
    "TrainResult",
    "TrainingRun",
    "apply_lora",
    "load_base_model",
    "merge_model",
    "train_model",
    "upcast_trainable",
]


SEED_DEFAULT_FOLDER = "lora_finetuned"  # where the seed put an adapter when model_save_path was unset


def adapter_destination(config: TrainConfig, base_path: str | Path | None) -> Path:
    """The seed's rule: an absolute `model_save_path` as is, a relative one under `base_path`
    (default: the working directory), and `base_path/lora_finetuned` when it is unset."""
    base = Path(base_path) if base_path is not None else Path(".")
    if config.model_save_path is None:
        return base / SEED_DEFAULT_FOLDER
    path = Path(config.model_save_path)
    return path if path.is_absolute() else base / path


def train_model(
    config: TrainConfig | dict[str, Any] | None = None,
    dataset: Dataset = "",
    base_path: str | Path | None = None,
    *,
    output_dir: str | Path | None = None,
    lora_path: str | Path | None = None,
    validation: Dataset | None = None,
    checkpoint_dir: str | Path | None = None,
    results_path: str | Path | None = None,
    run_name: str | None = None,
    on_progress: ProgressCallback | None = None,
    on_event: EventCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    wandb: WandbSpec | None = None,
    state_dir: str | Path | None = None,
    state_every: int = 0,
    pause_requested: Callable[[], bool] | None = None,
) -> TrainResult:
    """Fine-tune a LoRA adapter in this process and save it.

    `dataset` (and `validation`) is a JSON Lines path or an iterable of records, in any shape
    `shared.chat_formats` accepts. The adapter goes to `output_dir` when given, else where the seed
    put it (`adapter_destination`). A destination holding anything this service did not write is
    refused before training (`shared.outputs.DestinationInUse`). `on_progress` is called on every
    step; `on_event(payload, message)` gets typed events (`shared.events`); `should_stop` is polled
    every step (the run then ends without saving). Checkpoints go to `checkpoint_dir` at each epoch
    end; `results_path` gets a CSV row per logged step (`shared.results`); `wandb` names a Weights &
    Biases run (used where W&B is configured).

    `state_dir` keeps the run's resumable state (`worker.training.train_state`): saved every `state_every`
    steps (0: never), at each epoch end, and when `should_stop` ends the run while
    `pause_requested()` is true (the result is then `paused`). A run over a `state_dir` holding a
    state of the same config and data continues from it; a state of anything else is ignored with a
    warning event. The folder is deleted once the adapter is saved.
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.model_validate(config or {})
    adapter = Path(lora_path) if lora_path is not None else (Path(cfg.lora_path) if cfg.lora_path else None)
    run = TrainingRun(
        cfg,
        dataset,
        Path(output_dir) if output_dir is not None else adapter_destination(cfg, base_path),
        lora_path=adapter,
        validation=validation,
        checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir else None,
        results_path=Path(results_path) if results_path else None,
        run_name=run_name,
        on_progress=on_progress,
        on_event=on_event,
        should_stop=should_stop,
        wandb=wandb,
        state_dir=Path(state_dir) if state_dir is not None else None,
        state_every=state_every,
        pause_requested=pause_requested,
    )
    try:
        run.setup()
    except StoppedEarly:
        paused = pause_requested is not None and pause_requested()  # a saved state, if any, is kept
        return TrainResult(None, True, 0, 0, None, 0, 0, 0, 0.0, 0.0, paused=paused)
    result = run.train()
    if not result.stopped:
        run.save(result)
    return result
