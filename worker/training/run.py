"""One fine-tuning run: `setup` (model, data, adapter), `train` (the loop with its reports), `save`.

Each phase is a method so the job runner, the library call and tests can drive and inspect them;
progress, events, checkpoints and W&B are wired here and nowhere else.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any, TypeVar

import torch
from peft import PeftModel
from transformers import PreTrainedModel

from shared import events
from shared.chat_formats import to_chat
from shared.config import TrainConfig, TrainingMethod
from shared.events import EpochEnd, StepMetrics
from shared.jobs import Progress, WandbSpec
from shared.metrics import SavedCheckpoint, TrainingSummary
from shared.outputs import check_destination
from shared.preference import to_preference
from shared.stored_dataset import read_preference_records, read_records
from shared.volume import TRAINING_SUMMARY
from worker import cpu_budget
from worker.training.base_name import recorded_base, save_adapter
from worker.training.checkpoints import Checkpoints
from worker.training.data import tokenize_dataset
from worker.training.dpo import DpoStep, dpo_evaluate, tokenize_preferences
from worker.training.evaluation import EvalResult, evaluate
from worker.training.loop import LoopHooks, LoopPlan, LoopResult, StepInfo, train_loop
from worker.training.model_loading import EventCallback, load_base_model, pick_device, prepare_model
from worker.training.resident import ResidentBase, compile_cache_location
from worker.training.results_log import ResultsLog
from worker.training.run_io import LocalControl, RunControl, RunPaths
from worker.training.staged_dir import staged_dir
from worker.training.state_writer import StateWriter
from worker.training.train_state import (
    LoopState,
    UnusableState,
    check_applicable,
    clear_train_state,
    fingerprint,
    load_train_state,
    save_train_state,
)
from worker.training.wandb_log import WandbRun

log = logging.getLogger(__name__)

Dataset = str | Path | Iterable[dict[str, Any]]
T = TypeVar("T")


@dataclass
class TrainResult:
    output_dir: Path | None  # None when the run was stopped before saving
    stopped: bool
    steps: int
    total_steps: int
    final_loss: float | None
    num_examples: int
    skipped_examples: int
    total_tokens: int
    elapsed_s: float
    tokens_per_second: float
    losses: list[tuple[int, float]] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)  # (epoch, loss)
    checkpoints: list[SavedCheckpoint] = field(default_factory=list)
    paused: bool = False  # stopped by a pause: the state to resume from is saved (see `TrainingRun`)

    def summary(self) -> TrainingSummary:
        """The run's figures as every reader parses them (and `training_summary.json` holds them)."""
        fields = {f.name: getattr(self, f.name) for f in dataclass_fields(self)}
        return TrainingSummary.model_validate(
            {**fields, "output_dir": str(self.output_dir) if self.output_dir else None}
        )


class StoppedEarly(Exception):
    """should_stop() said so before training began (while loading or tokenizing)."""


def split_validation(examples: list[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Hold out `fraction` of the examples (at least one, never all), reproducibly."""
    if len(examples) < 2:
        raise ValueError("validation_split needs at least 2 usable examples")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in order[:n_eval]]


def _records(dataset: Dataset, method: TrainingMethod) -> Iterable[dict[str, Any]]:
    """Chat records (preference records for DPO) from a normalised JSON Lines file, or from records in any
    accepted shape."""
    if isinstance(dataset, str | Path):
        yield from (read_preference_records if method == "dpo" else read_records)(Path(dataset))
        return
    for i, raw in enumerate(dataset):
        record, reason = to_preference(raw) if method == "dpo" else to_chat(raw)
        if record is None:
            raise ValueError(f"dataset record {i + 1}: {reason}")
        yield record


class TrainingRun:
    """A LoRA fine-tuning run of `config` on `dataset`, saved to `output_dir`: supervised on chat records, or
    (``config.method == "dpo"``) DPO on preference pairs (`worker.training.dpo`).

    `paths` says where it writes (`RunPaths`), `control` who steers it (`RunControl`: progress, events,
    stop, pause). With `paths.state`, the run's full state (`worker.training.train_state`) is saved there
    every `paths.state_every_s` seconds and/or `paths.state_every` steps, at each epoch end and when a
    stop is a pause, written in the background (`worker.training.state_writer`: `train` returns once every
    write is done); a later run of the same config and data over the same folder continues from it, and
    `save` deletes it.

    `config.model_name` and `config.lora_path` are loaded as they are: a job's runner hands over the
    folders its submission resolved.
    """

    def __init__(
        self,
        config: TrainConfig,
        dataset: Dataset,
        paths: RunPaths,
        *,
        validation: Dataset | None = None,
        control: RunControl | None = None,
        wandb: WandbSpec | None = None,
        resident: ResidentBase | None = None,
    ) -> None:
        self.config, self.dataset, self.validation, self.paths = config, dataset, validation, paths
        self.output_dir = paths.output
        self.control: RunControl = control or LocalControl()
        self.emit: EventCallback = self.control.emit
        self.wandb_spec = wandb
        self.resident = resident  # keeps the base loaded for the next run in this process (see `close`)
        self.lora_path = Path(config.lora_path) if config.lora_path else None  # resolved by whoever made the config
        # What the adapter and its checkpoints record as their base (not the name a continued adapter brings,
        # perhaps a relative one): the hub id, or the folder's absolute path.
        self.base_name = recorded_base(config.model_name)
        self._fingerprint = ""
        self.checkpoints = Checkpoints(paths.checkpoints, config.keep_checkpoints, base=self.base_name)
        self.results = ResultsLog(paths.results)
        self.device = pick_device()
        self.started = time.monotonic()
        # Examples (sft), or PreferencePairs (dpo): what the loop's step takes.
        self.examples: list[Any] = []
        self.held_out: list[Any] = []
        self.skipped = 0
        self.eval_losses: list[tuple[int, float]] = []
        self.model: PeftModel | None = None
        self.dpo_step: DpoStep | None = None
        self.tokenizer: Any = None
        self._last_step_at = 0.0
        self._last_step = 0
        self._last_loss: float | None = None
        self._valid_batches = 0  # validation batches evaluated at logging steps so far
        self._last_valid: EvalResult | None = None  # the latest of them

    # ----------------------------------------------------------------- setup

    def setup(self) -> None:
        """Load the base, tokenize the data, put the adapter on. Raises `StoppedEarly` on a stop request."""
        cfg = self.config
        cpu_budget.apply_to_torch()  # in a worker: its threads as planned when its process started
        check_destination(self.output_dir)  # refuse before any work, not after hours of training
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        base = self._load_base()
        torch.manual_seed(cfg.seed)  # the adapter's init must not depend on whether the base was loaded or reused
        self._check_stop()  # a cancel that arrived while the model loaded
        self.examples, self.skipped = self._tokenize(self.dataset)
        if self.validation is not None:
            self.held_out = self._tokenize(self.validation)[0]
        if cfg.validation_split and not self.held_out:
            self.examples, self.held_out = split_validation(self.examples, cfg.validation_split, cfg.seed)
        if not self.examples:
            raise ValueError("no example has an assistant token to train on (check max_length and the dataset)")
        self.model = prepare_model(base, cfg, self.lora_path)
        trainable, total = self.model.get_nb_trainable_parameters()
        threads = torch.get_num_threads()  # what the worker's CPU budget (worker.cpu_budget) left torch
        self.emit(
            events.info(trainable_params=trainable, total_params=total, examples=len(self.examples),
                       device=self.device.type, validation_examples=len(self.held_out), engine=self.engine,
                       torch_threads=threads),
            f"training {trainable:,} of {total:,} parameters on {len(self.examples)} examples ({self.device.type}, "
            f"{threads} CPU thread{'s' if threads != 1 else ''})",
        )  # fmt: skip

    def _load_base(self) -> PreTrainedModel:
        """The base model (loaded, or the resident one reused) and the tokenizer; an event says which and why."""
        cfg = self.config
        # Loading takes seconds to minutes before the first step: say so (the event stays in the job's
        # stream; the status line is the job's message, /status's, until training starts).
        loading = f"Loading model {self.base_name}..."
        self.control.status(loading)
        self.emit(events.info(model=self.base_name, phase="loading_model"), loading[0].lower() + loading[1:])
        started = time.monotonic()
        if self.resident is None:
            base, self.tokenizer, self.engine = load_base_model(cfg, self.device, self.emit)
            reused, reason = False, "the base is not kept between jobs"
        else:
            got = self.resident.acquire(cfg, self.device, self.emit)
            base, self.tokenizer, self.engine = got.model, got.tokenizer, got.engine
            reused, reason = got.reused, got.reason
        seconds = round(time.monotonic() - started, 2)
        cache = compile_cache_location()
        how = "reused from the previous job" if reused else f"loaded in {seconds:.1f} s ({reason})"
        self.emit(
            events.info(base_model="reused" if reused else "loaded", reason=reason or None, load_seconds=seconds,
                        **cache),
            f"model {how}; compile cache at {cache['compile_cache']}",
        )  # fmt: skip
        self.control.status("Training...")
        return base

    def close(self) -> None:
        """Give the base back to the resident cache (the adapter taken off it), whatever the run's outcome."""
        if self.resident is not None:
            self.resident.release()

    def _tokenize(self, source: Dataset) -> tuple[list[Any], int]:
        cfg = self.config
        records = self._watch(_records(source, cfg.method))
        examples: list[Any]
        if cfg.method == "dpo":
            examples, skipped = tokenize_preferences(
                self.tokenizer, records, max_length=cfg.max_length, response_template=cfg.response_template
            )
            what = "preference pairs had a completion with no token left after truncation"
        else:
            examples, skipped = tokenize_dataset(
                self.tokenizer, records, max_length=cfg.max_length, response_template=cfg.response_template
            )
            what = "examples had no assistant token left after truncation"
        if skipped:
            message = f"{skipped} {what} and were skipped"
            self.emit(events.warning(skipped=skipped), message)
        return examples, skipped

    def _watch(self, records: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Pass records through, checking for a stop request every 256 (100k records take a while)."""
        for i, record in enumerate(records):
            if i % 256 == 0:
                self._check_stop()
            yield record

    def _check_stop(self) -> None:
        if self.control.should_stop():
            raise StoppedEarly

    # ----------------------------------------------------------------- train

    def train(self) -> TrainResult:
        """Run the loop; the result's `output_dir` is set by `save`."""
        assert self.model is not None, "setup() first"
        cfg = self.config
        self.wandb = WandbRun(self.paths.run_name, cfg.model_dump(), self.emit, self.wandb_spec)
        self._last_step_at = time.monotonic()
        resume = self._resume()
        if cfg.method == "dpo":
            self.dpo_step = DpoStep(self.model, kind=self.engine, device=self.device, beta=cfg.dpo_beta)
        try:
            # Leaving waits for the write in flight: the job reports its end, and `save` deletes the
            # folder, only once nothing writes into it any more.
            with self._state_writer() as writer:
                hooks = LoopHooks(on_step=self._on_step, on_epoch_end=self._on_epoch_end, save_state=writer)
                plan = LoopPlan.of_run(cfg, self.device, state_every=self.paths.state_every,
                                       state_every_s=self.paths.state_every_s)  # fmt: skip
                loop = train_loop(self.model, self.examples, plan, device=self.device, engine=self.engine,
                                  control=self.control, hooks=hooks, resume=resume, step_fn=self.dpo_step)  # fmt: skip
        except BaseException:
            self.wandb.finish()
            raise
        self.wandb.finish({"final_loss": loop.final_loss, "stopped": loop.stopped, "paused": loop.paused})
        return self._result(loop)

    def _total_steps(self) -> int:
        return self.config.epochs * math.ceil(len(self.examples) / self.config.batch_size)

    def _resume(self) -> LoopState | None:
        """The saved state this run goes on from: the newest in `paths.state` made for this config and data."""
        if self.paths.state is None:
            return None
        assert self.model is not None
        self._fingerprint = fingerprint(self.config, self.lora_path, self.examples, len(self.held_out))
        loaded = load_train_state(self.paths.state, fingerprint=self._fingerprint)
        state, problems = loaded.state, loaded.problems
        if state is not None:
            try:
                check_applicable(self.model, state, self._total_steps())
            except UnusableState as exc:
                problems.append(f"step {state.step}: {exc}")
                state = None
        for problem in problems:
            self.emit(events.warning(component="train_state"), f"saved training state not used: {problem}")
        if state is None:
            return None
        # What the run itself accumulated before the stop: epoch ends already done are not redone.
        self.eval_losses = list(state.eval_losses)
        self.checkpoints.saved = list(state.checkpoints)
        self._last_step, self._last_loss = state.step, state.final_loss
        self.results.resume_at(state.step)
        # Each logging step evaluated the next validation batch in turn: continue the turn where it was.
        self._valid_batches = len(state.logged_losses)
        self.emit(
            events.info(resumed_step=state.step, epoch=state.epoch, total_steps=state.total_steps),
            f"resuming from step {state.step}/{state.total_steps} (epoch {state.epoch})",
        )
        return state

    def _state_writer(self) -> AbstractContextManager[StateWriter | None]:
        if self.paths.state is None:
            return nullcontext(None)
        publish = self.paths.publish
        if publish is None:
            return StateWriter(self.paths.state, fingerprint=self._fingerprint, emit=self.emit,
                               complete=self._complete_state)  # fmt: skip

        def write_and_publish(folder: Path, state: LoopState, fingerprint: str) -> Path:
            dest = save_train_state(folder, state, fingerprint=fingerprint)
            publish(dest)
            return dest

        return StateWriter(self.paths.state, fingerprint=self._fingerprint, emit=self.emit,
                           complete=self._complete_state, write=write_and_publish)  # fmt: skip

    def _complete_state(self, state: LoopState) -> None:
        """What the run, not the loop, accumulated: a resume does not redo its epoch ends."""
        state.eval_losses, state.checkpoints = list(self.eval_losses), list(self.checkpoints.saved)

    def _result(self, loop: LoopResult) -> TrainResult:
        return TrainResult(
            output_dir=None,
            stopped=loop.stopped,
            steps=loop.steps_done,
            total_steps=self._total_steps(),
            final_loss=loop.final_loss,
            num_examples=len(self.examples),
            skipped_examples=self.skipped,
            total_tokens=loop.total_tokens,
            elapsed_s=time.monotonic() - self.started,
            tokens_per_second=loop.total_tokens / loop.elapsed_s if loop.elapsed_s > 0 else 0.0,
            losses=list(loop.logged_losses),
            eval_losses=self.eval_losses,
            checkpoints=self.checkpoints.saved,
            paused=loop.paused,
        )

    def _on_step(self, info: StepInfo) -> None:
        now = time.monotonic()
        step_seconds, self._last_step_at = now - self._last_step_at, now
        self._last_step = info.step
        self.control.publish(
            Progress(
                step_seconds=step_seconds,
                current_step=info.step,
                total_steps=info.total_steps,
                current_epoch=info.epoch,
                total_epochs=info.epochs,
                loss=info.loss if info.loss is not None else self._last_loss,  # the latest read
                learning_rate=info.learning_rate,
                grad_norm=info.grad_norm,
                tokens_per_second=info.tokens_per_second,
                eta_seconds=info.eta_seconds,
                elapsed_seconds=info.elapsed_s,
                **self._gpu_memory(),
            )
        )
        if info.loss is None:
            return
        self._last_loss = info.loss
        valid = self._valid_batch()
        metrics = StepMetrics(step=info.step, epoch=info.epoch, loss=info.loss, accuracy=info.accuracy,
                              valid_loss=valid.loss if valid else None, valid_accuracy=valid.accuracy if valid else None,
                              learning_rate=info.learning_rate, grad_norm=info.grad_norm,
                              tokens_per_second=info.tokens_per_second, step_seconds=step_seconds,
                              **(info.metrics or {}))  # fmt: skip
        shown = "".join(f" {name} {value:.4f}" for name, value in (info.metrics or {}).items())
        self.emit(metrics, f"step {info.step}/{info.total_steps} loss {info.loss:.4f}{shown}")
        self.results.add(metrics)
        figures = {"train/loss": info.loss, "train/mean_token_accuracy": info.accuracy,
                   "train/learning_rate": info.learning_rate, "train/grad_norm": info.grad_norm,
                   "train/tokens_per_second": info.tokens_per_second, "valid/loss": metrics.valid_loss,
                   "valid/mean_token_accuracy": metrics.valid_accuracy,
                   **{f"train/{k}": v for k, v in (info.metrics or {}).items()}}  # fmt: skip
        self.wandb.log({k: v for k, v in figures.items() if v is not None}, step=info.step)
        if valid is not None:
            self._last_step_at = time.monotonic()  # the next step's step_seconds times the step, not this evaluation

    def _valid_batch(self) -> EvalResult | None:
        """OpenAI's per-step `valid_*`: one training-sized batch of the validation set, a different one
        each logging step (in turn). One no-grad forward of a batch per logging step costs about a third
        of a training step where every step is logged (CPU), a few percent at the GPU's log_every 10."""
        if not self.held_out:
            return None
        assert self.model is not None
        size = self.config.batch_size
        batches = -(-len(self.held_out) // size)
        start = (self._valid_batches % batches) * size
        self._valid_batches += 1
        batch = self.held_out[start : start + size]
        self._last_valid = self._evaluate(batch)
        return self._last_valid

    def _evaluate(self, items: list[Any]) -> EvalResult:
        """Held-out loss and accuracy: token loss and accuracy (sft), or DPO loss and reward accuracy (dpo)."""
        assert self.model is not None
        if self.dpo_step is not None:
            return dpo_evaluate(self.dpo_step, items, batch_size=self.config.batch_size)
        return evaluate(self.model, items, batch_size=self.config.batch_size, device=self.device)

    def _gpu_memory(self) -> dict[str, float]:
        """The seed's gpu_alloc_mem / gpu_reserved_mem, in MiB (host-side counters: no device sync)."""
        if self.device.type != "cuda":
            return {"allocated_gpu_memory": 0.0, "reserved_gpu_memory": 0.0}
        return {
            "allocated_gpu_memory": torch.cuda.memory_allocated(self.device) / 2**20,
            "reserved_gpu_memory": torch.cuda.memory_reserved(self.device) / 2**20,
        }

    def _on_epoch_end(self, epoch: int, loss: float | None, accuracy: float | None) -> None:
        assert self.model is not None
        full = None
        if self.held_out:
            full = self._evaluate(self.held_out)
        message = f"epoch {epoch}/{self.config.epochs} done"
        if full is not None:
            self.eval_losses.append((epoch, full.loss))
            message += f", eval loss {full.loss:.4f}"
            self.wandb.log({"eval/loss": full.loss, "eval/mean_token_accuracy": full.accuracy}, step=self._last_step)
        self.emit(EpochEnd(epoch=epoch, step=self._last_step, loss=loss, accuracy=accuracy,
                           eval_loss=full.loss if full else None, eval_accuracy=full.accuracy if full else None),
                  message)  # fmt: skip
        valid = self._last_valid
        saved = self.checkpoints.save(
            self.model, step=self._last_step, epoch=epoch, train_loss=loss, train_mean_token_accuracy=accuracy,
            valid_loss=valid.loss if valid else None, valid_mean_token_accuracy=valid.accuracy if valid else None,
            full_valid_loss=full.loss if full else None, full_valid_mean_token_accuracy=full.accuracy if full else None,
        )  # fmt: skip
        if saved is not None:
            if self.paths.publish is not None and self.checkpoints.saved:
                self.paths.publish(Path(self.checkpoints.saved[-1].path))
            self.emit(saved, f"checkpoint at step {saved.step} saved")

    # ----------------------------------------------------------------- save

    def save(self, result: TrainResult) -> None:
        """Write the adapter, tokenizer and summary into a staged folder, then swap it into place
        (and then, in a library call, delete the run's saved state)."""
        assert self.model is not None
        result.output_dir = self.output_dir
        summary = {**result.summary().model_dump(), "config": self.config.model_dump()}
        # The job's id in the marker: a run the job's record could not be told of (its lease lapsed) is
        # recognised by whoever settles the job next, which records it as succeeded instead of retraining.
        marker = {"base_model": self.base_name, "job": self.paths.job_id}
        with staged_dir(self.output_dir, "adapter", **marker) as staging:
            save_adapter(self.model, staging, self.base_name)
            if self.config.tokenizer_padding_side is not None:
                self.tokenizer.padding_side = self.config.tokenizer_padding_side
            self.tokenizer.save_pretrained(str(staging))
            (staging / TRAINING_SUMMARY).write_text(json.dumps(summary, indent=2))
        if self.paths.state is not None and self.paths.job_id is None:
            # A library call's state goes now. A job's stays until its outcome is recorded (the runner
            # drops it then): were the record lost, the next run would otherwise start from step 1.
            clear_train_state(self.paths.state)
