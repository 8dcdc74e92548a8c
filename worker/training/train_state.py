"""A run's full state at a step boundary, saved so that pause/resume and a crash lose nothing.

What the loop needs to go on exactly as if it had never stopped: the trained parameters (every
``requires_grad`` one, by name: LoRA weights and modules_to_save copies), AdamW's state, the step
(the learning rate is `linear_decay` of it), the data position (epoch and next batch of that
epoch's `batch_order`), the RNG states (dropout draws from them) and the loop's accumulators.

On disk, under a run's state folder (`shared.volume.Volume.job_state`)::

    step-000120/tensors.pt   parameters, optimizer state, RNG states, the epoch's loss sum
    step-000120/state.json   `TrainStateMeta`, written last
    .step-000120.*.tmp       a state being written (ignored, removed by the next save)

Each state is written into a hidden sibling and renamed into place, then older ones are deleted,
so a crash at any moment leaves the previous complete state or the new one, never a half-written
one. A state carries a fingerprint of what shapes the training; one of another config or dataset
is never applied.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from shared.config import TrainConfig
from shared.metrics import SavedCheckpoint
from worker.training.example import Example

STATE_VERSION = 1
STATE_META = "state.json"
STATE_TENSORS = "tensors.pt"
_STATE_NAME = re.compile(r"^step-(\d{1,12})$")

# TrainConfig fields that do not change the sequence of updates: a state stays valid across them.
_NOT_TRAINING = frozenset(
    {"model_save_path", "tokenizer_padding_side", "log_every", "keep_checkpoints", "train_round", "compile"}
)


class UnusableState(Exception):
    """A saved state that cannot be applied (another config, a damaged file, another model)."""


@dataclass(slots=True)
class RngState:
    python: Any  # random.getstate()
    torch_cpu: torch.Tensor
    cuda: list[torch.Tensor] | None = None  # one per visible device, when on CUDA


def capture_rng(device: torch.device) -> RngState:
    cuda = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
    return RngState(random.getstate(), torch.get_rng_state(), cuda)


def restore_rng(rng: RngState, device: torch.device) -> None:
    random.setstate(rng.python)
    torch.set_rng_state(rng.torch_cpu)
    if device.type == "cuda" and rng.cuda is not None:
        torch.cuda.set_rng_state_all(rng.cuda)


@dataclass(slots=True)
class LoopState:
    """Where `train_loop` stands between two steps. Tensors may be the live ones: a saver
    (`worker.training.state_writer`) copies them during its `save` call and keeps no reference."""

    step: int  # optimizer steps done (the scheduler's position: the next step is step + 1)
    epoch: int  # 1-based epoch of the next batch; epochs + 1 once all are done
    batch_index: int  # the next batch within that epoch's `batch_order`
    total_steps: int
    total_tokens: int
    epoch_loss_sum: torch.Tensor | None  # the current epoch's summed step losses (device tensor)
    epoch_steps: int  # steps of the current epoch done
    final_loss: float | None  # the last step's loss
    logged_losses: list[tuple[int, float]]
    elapsed_s: float  # training seconds, across every session of the run
    params: dict[str, torch.Tensor]  # trainable parameters by name
    optimizer: dict[str, Any]  # optimizer.state_dict()
    rng: RngState
    eval_losses: list[tuple[int, float]] = field(default_factory=list)  # filled in by the run
    checkpoints: list[SavedCheckpoint] = field(default_factory=list)  # filled in by the run
    epoch_accuracy_sum: torch.Tensor | None = None  # the current epoch's summed token accuracies


class TrainStateMeta(BaseModel):
    """`state.json`: where the run stood, what it was a run of, and its JSON-able accumulators."""

    model_config = ConfigDict(extra="ignore")

    version: int = STATE_VERSION
    fingerprint: str = Field(description="hash of the config fields that shape training and of the data")
    step: int = Field(ge=0, description="optimizer steps done")
    epoch: int = Field(ge=1, description="epoch of the next batch (1-based)")
    batch_index: int = Field(ge=0, description="next batch within that epoch")
    total_steps: int = Field(ge=1)
    total_tokens: int = Field(ge=0)
    epoch_steps: int = Field(ge=0)
    final_loss: float | None = None
    elapsed_s: float = Field(ge=0.0)
    param_names: list[str]
    logged_losses: list[tuple[int, float]] = Field(default_factory=list)
    eval_losses: list[tuple[int, float]] = Field(default_factory=list)
    checkpoints: list[SavedCheckpoint] = Field(default_factory=list)
    created_at: float


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every trained parameter by name, in `model.parameters()` order (the optimizer's order)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def fingerprint(config: TrainConfig, lora_path: Path | None, examples: Sequence[Any], held_out: int) -> str:
    """What a state must agree with to be applied: the config fields that shape training, the
    adapter it started from, and the tokenized data (counts, not contents: hashing every token of a
    large dataset would cost more than it is worth; a changed dataset changes these counts)."""
    shaping = {k: v for k, v in config.model_dump(mode="json").items() if k not in _NOT_TRAINING}
    data = [len(examples), sum(_num_tokens(e) for e in examples), held_out]
    blob = json.dumps({"config": shaping, "lora_path": str(lora_path), "data": data}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _num_tokens(item: Any) -> int:
    """Tokens of an `Example`, or of both sequences of a DPO preference pair (`worker.training.dpo.PreferencePair`)."""
    if isinstance(item, Example):
        return len(item.input_ids)
    return len(item.chosen.input_ids) + len(item.rejected.input_ids)


def state_name(step: int) -> str:
    return f"step-{step:06d}"


# ----------------------------------------------------------------------------- save


def save_train_state(folder: Path, state: LoopState, *, fingerprint: str) -> Path:
    """Write `state` as `folder/step-NNNNNN` (staged, then renamed); older states are then removed."""
    folder.mkdir(parents=True, exist_ok=True)
    _remove_staging(folder)
    dest = folder / state_name(state.step)
    staging = folder / f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        staging.mkdir()
        torch.save(_tensors(state), staging / STATE_TENSORS)
        (staging / STATE_META).write_text(_meta(state, fingerprint).model_dump_json())  # last: marks it complete
        if dest.exists():  # the same step saved twice (a pause right after a periodic save)
            shutil.rmtree(dest)
        os.replace(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for other in folder.iterdir():
        if other != dest and _STATE_NAME.match(other.name):
            shutil.rmtree(other, ignore_errors=True)
    return dest


def _tensors(state: LoopState) -> dict[str, Any]:
    rng = state.rng
    return {
        "params": {name: t.detach() for name, t in state.params.items()},
        "optimizer": state.optimizer,
        "epoch_loss_sum": None if state.epoch_loss_sum is None else state.epoch_loss_sum.detach(),
        "epoch_accuracy_sum": None if state.epoch_accuracy_sum is None else state.epoch_accuracy_sum.detach(),
        "rng": {"python": rng.python, "torch_cpu": rng.torch_cpu, "cuda": rng.cuda},
    }


def _meta(state: LoopState, fingerprint: str) -> TrainStateMeta:
    return TrainStateMeta(
        fingerprint=fingerprint, step=state.step, epoch=state.epoch, batch_index=state.batch_index,
        total_steps=state.total_steps, total_tokens=state.total_tokens, epoch_steps=state.epoch_steps,
        final_loss=state.final_loss, elapsed_s=state.elapsed_s, param_names=list(state.params),
        logged_losses=state.logged_losses, eval_losses=state.eval_losses, checkpoints=state.checkpoints,
        created_at=time.time(),
    )  # fmt: skip


def _remove_staging(folder: Path) -> None:
    """Staging folders a crash left behind: never complete, never read."""
    for stale in folder.glob(".step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def clear_train_state(folder: Path) -> None:
    """Delete a run's state folder (its adapter is saved: nothing is left to resume)."""
    shutil.rmtree(folder, ignore_errors=True)


# ----------------------------------------------------------------------------- load


@dataclass(slots=True)
class LoadedState:
    state: LoopState | None  # the newest applicable state; None when there is none
    problems: list[str]  # why each newer state found was not used


def load_train_state(folder: Path, *, fingerprint: str) -> LoadedState:
    """The newest complete state in `folder` made with `fingerprint` (read onto the CPU)."""
    problems: list[str] = []
    candidates = sorted(
        (int(m.group(1)), path)
        for path in (folder.iterdir() if folder.is_dir() else [])
        if (m := _STATE_NAME.match(path.name)) and path.is_dir()
    )
    for _, path in reversed(candidates):
        try:
            return LoadedState(_read(path, fingerprint), problems)
        except UnusableState as exc:
            problems.append(f"{path.name}: {exc}")
    return LoadedState(None, problems)


def _read(path: Path, expected: str) -> LoopState:
    try:
        meta = TrainStateMeta.model_validate_json((path / STATE_META).read_text())
    except (OSError, ValidationError) as exc:
        raise UnusableState(f"unreadable {STATE_META} ({type(exc).__name__})") from exc
    if meta.version != STATE_VERSION:
        raise UnusableState(f"written by format version {meta.version}, not {STATE_VERSION}")
    if meta.fingerprint != expected:
        raise UnusableState("made with another config or dataset")
    try:
        tensors = torch.load(path / STATE_TENSORS, map_location="cpu", weights_only=True)
        rng = tensors["rng"]
        return LoopState(
            step=meta.step, epoch=meta.epoch, batch_index=meta.batch_index, total_steps=meta.total_steps,
            total_tokens=meta.total_tokens, epoch_loss_sum=tensors["epoch_loss_sum"], epoch_steps=meta.epoch_steps,
            final_loss=meta.final_loss, logged_losses=meta.logged_losses, elapsed_s=meta.elapsed_s,
            params=tensors["params"], optimizer=tensors["optimizer"],
            rng=RngState(_python_rng(rng["python"]), rng["torch_cpu"], rng["cuda"]),
            eval_losses=meta.eval_losses, checkpoints=meta.checkpoints,
            epoch_accuracy_sum=tensors.get("epoch_accuracy_sum"),
        )  # fmt: skip
    except Exception as exc:  # a truncated or damaged file: any of pickle's, zip's or torch's errors
        raise UnusableState(f"unreadable {STATE_TENSORS} ({type(exc).__name__}: {exc})") from exc


def _python_rng(value: Any) -> Any:
    """`random.setstate` wants tuples; a saved state may hand back lists."""
    version, internal, gauss = value
    return (version, tuple(internal), gauss)


# ----------------------------------------------------------------------------- apply


def check_applicable(model: nn.Module, state: LoopState, total_steps: int) -> None:
    """Raise `UnusableState` unless `state` fits `model` and a run of `total_steps` steps."""
    if state.total_steps != total_steps:
        raise UnusableState(f"planned {state.total_steps} steps, this run plans {total_steps}")
    params = trainable_parameters(model)
    if list(params) != list(state.params):
        raise UnusableState("the trainable parameters differ from the saved ones")
    for name, param in params.items():
        saved = state.params[name]
        if saved.shape != param.shape:
            raise UnusableState(f"{name}: saved shape {tuple(saved.shape)}, model has {tuple(param.shape)}")


def apply_loop_state(model: nn.Module, optimizer: Any, state: LoopState, total_steps: int) -> None:
    """Put the saved parameters and optimizer state into a freshly built model and optimizer.

    The optimizer's own param groups are kept (its flags, e.g. capturable or fused, and its
    learning-rate tensor belong to this session's device and engine): only the per-parameter state
    (moments, step counts) is taken from the save, cast to where each parameter lives.
    """
    check_applicable(model, state, total_steps)
    with torch.no_grad():
        for name, param in trainable_parameters(model).items():
            param.copy_(state.params[name])
    live_groups = optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict({"state": state.optimizer["state"], "param_groups": live_groups})
