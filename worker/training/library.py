"""The library entry point: fine-tune one LoRA adapter in this process (no server, no Redis).

from worker.training import train_model, TrainConfig
train_model(TrainConfig(model_name="Qwen/Qwen2.5-0.5B", epochs=1), "data.jsonl", "out/my_adapter")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.config import TrainConfig
from shared.jobs import WandbSpec
from worker.training.merge import merge_model
from worker.training.model_loading import apply_lora, load_base_model, upcast_trainable
from worker.training.resident import ResidentBase
from worker.training.run import Dataset, StoppedEarly, TrainingRun, TrainResult
from worker.training.run_io import LocalControl, RunControl, RunPaths

__all__ = [
    "LocalControl",
    "RunControl",
    "RunPaths",
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
    validation: Dataset | None = None,
    paths: RunPaths | None = None,
    control: RunControl | None = None,
    wandb: WandbSpec | None = None,
    resident: ResidentBase | None = None,
) -> TrainResult:
    """Fine-tune a LoRA adapter in this process and save it.

    `dataset` (and `validation`) is a JSON Lines path or an iterable of records, in any shape
    `shared.chat_formats` accepts. The adapter goes to `paths.output` when `paths` is given (a job's
    runner gives all its paths: `RunPaths.of_job`), else to `output_dir`, else where the seed put it
    (`adapter_destination`). A destination holding anything this service did not write is refused
    before training (`shared.outputs.DestinationInUse`). `config.lora_path` continues that adapter
    (relative to the working directory). `control` (`RunControl`) gets progress and typed events and
    may stop the run (it then ends without saving, or, when the stop is a pause and `paths.state` is
    set, with its state saved: the result is then `paused`); `wandb` names a Weights & Biases run
    (used where W&B is configured). `resident` keeps the base model loaded after the run, for the next run
    of the same model in this process (`worker.training.resident`); without it the base is loaded for this
    run only.

    A run over a `paths.state` holding a state of the same config and data continues from it; a state
    of anything else is ignored with a warning event. The state is deleted once the adapter is saved
    (a job's, `paths.job_id` set, by its runner once the outcome is recorded).
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.model_validate(config or {})
    if paths is not None and output_dir is not None:
        raise ValueError("give the output folder once: as output_dir or as paths.output")
    if paths is None:
        paths = RunPaths(Path(output_dir) if output_dir is not None else adapter_destination(cfg, base_path))
    run = TrainingRun(cfg, dataset, paths, validation=validation, control=control, wandb=wandb, resident=resident)
    try:
        try:
            run.setup()
        except StoppedEarly:
            paused = run.control.pause_requested()  # a saved state, if any, is kept
            return TrainResult(None, True, 0, 0, None, 0, 0, 0, 0.0, 0.0, paused=paused)
        result = run.train()
        if not result.stopped:
            run.save(result)
        return result
    finally:
        run.close()  # failed, stopped or saved: the resident base gets its adapter taken off
