"""Adapter checkpoints at epoch ends: ``root/step-NNNNNN/`` with ``checkpoint.json``, newest `keep` kept."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from peft import PeftModel

from shared.outputs import check_destination, write_marker


class Checkpoints:
    """Writes each checkpoint into a temporary sibling and renames it into place (never half-written)."""

    def __init__(self, root: Path | None, keep: int) -> None:
        self.root, self.keep = root, keep
        self.saved: list[dict[str, Any]] = []

    def save(self, model: PeftModel, *, step: int, epoch: int, loss: float | None, eval_loss: float | None) -> None:
        if self.root is None or self.keep == 0:
            return
        meta = {"step": step, "epoch": epoch, "loss": loss, "eval_loss": eval_loss, "created_at": time.time()}
        dest = self.root / f"step-{step:06d}"
        staging = self.root / f".step-{step:06d}.{uuid.uuid4().hex[:8]}.tmp"
        check_destination(dest)
        model.save_pretrained(str(staging))
        (staging / "checkpoint.json").write_text(json.dumps(meta))
        write_marker(staging, "checkpoint", step=step)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(staging, dest)
        self.saved.append({**meta, "path": str(dest)})
        while len(self.saved) > self.keep:
            shutil.rmtree(self.saved.pop(0)["path"], ignore_errors=True)
