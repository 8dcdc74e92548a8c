"""The training engine: one LoRA fine-tuning run in this process, with no Redis or Celery.

    from worker.training import train_model, TrainConfig
    train_model(TrainConfig(model_name="Qwen/Qwen2.5-0.5B", epochs=1), "data.jsonl", "out/my_adapter")

The entry point is `library.train_model`; `run` drives one run (setup, loop, save), `loop` the optimizer loop
over epochs, `optimizer_step` one optimizer step (eager or captured), `forward_backward` one step's forward and
backward. Around them: `speedups` decides per job whether compiling and capturing pay, `step_check` checks the
fast paths against the reference on real batches, `state_writer` saves the run's state off the training
thread, `resident` keeps the base model loaded between runs; the rest are the pieces they use. Importing the
package loads no torch until a name is used.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "LocalControl": "worker.training.run_io",
    "RunControl": "worker.training.run_io",
    "RunPaths": "worker.training.run_io",
    "TrainConfig": "shared.config",
    "TrainResult": "worker.training.run",
    "TrainingRun": "worker.training.run",
    "apply_lora": "worker.training.model_loading",
    "load_base_model": "worker.training.model_loading",
    "merge_model": "worker.training.merge",
    "train_model": "worker.training.library",
    "upcast_trainable": "worker.training.model_loading",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    # Lazy (PEP 562): the job side imports submodules of this package without paying for torch here.
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
