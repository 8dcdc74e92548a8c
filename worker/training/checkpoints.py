"""Adapter checkpoints at epoch ends: ``root/step-NNNNNN/`` (see `shared.volume`), newest `keep` kept."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from peft import PeftModel

from shared.metrics import CheckpointSaved, SavedCheckpoint
from shared.outputs import check_destination, write_marker
from shared.volume import CHECKPOINT_META, checkpoint_name, checkpoint_staging_name
from worker.training.base_name import save_adapter


class Checkpoints:
    """Writes each checkpoint into a temporary sibling and renames it into place (never half-written);
    its `checkpoint.json` is written last, so its presence means the checkpoint is complete."""

    def __init__(self, root: Path | None, keep: int, *, base: str) -> None:
        self.root, self.keep = root, keep
        self.base = base  # what each checkpoint's adapter_config.json names as its base (worker.training.base_name)
        self.saved: list[SavedCheckpoint] = []

    def save(self, model: PeftModel, *, step: int, epoch: int, **figures: float | None) -> CheckpointSaved | None:
        """Save one, with `figures` (`CheckpointMeta`'s metrics: train_loss, valid_loss, ...); None when
        this run keeps none."""
        if self.root is None or self.keep == 0:
            return None
        meta = CheckpointSaved.model_validate({"step": step, "epoch": epoch, **figures, "created_at": time.time()})
        dest = self.root / checkpoint_name(step)
        staging = self.root / checkpoint_staging_name(step)
        check_destination(dest)
        save_adapter(model, staging, self.base)
        write_marker(staging, "checkpoint", step=step)
        (staging / CHECKPOINT_META).write_text(meta.model_dump_json())
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(staging, dest)
        self.saved.append(SavedCheckpoint(**meta.model_dump(), path=str(dest)))
        while len(self.saved) > self.keep:
            shutil.rmtree(self.saved.pop(0).path, ignore_errors=True)
        return meta
