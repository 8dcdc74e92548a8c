"""The training loop every job runs: AdamW + linear decay + clipping over an engine's step function.

`batch_size` sequences make one optimizer step (the last step of an epoch may hold fewer). The
loop never reads a device value back except at logging steps (loss, grad norm, token accuracy: one
transfer), at epoch ends (the epoch's mean loss and accuracy) and once at the end, so the GPU is
never made to wait in between.
Saving the loop's state (`worker.training.train_state`: every `state_every_s` seconds and/or every
`state_every` steps, at epoch ends, on a pause) only enqueues copies to the host: a `StateSaver`
(`worker.training.state_writer`) writes them from another thread.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from shared import events
from shared.config import TrainConfig
from worker.training.attention import EngineKind
from worker.training.eta import EtaEstimator
from worker.training.example import Example
from worker.training.forward_backward import make_step_fn, unwrap
from worker.training.optimizer_step import (
    AnyStepFn,
    EagerTrainStep,
    EventFn,
    StaticTrainStep,
    TrainStep,
    TrainStepOutput,
    make_optimizer,
)
from worker.training.run_io import LocalControl, RunControl
from worker.training.speedups import SpeedupPlan, compile_cache_key, compile_cached, mark_compiled, plan_speedups
from worker.training.state_writer import StateSaver
from worker.training.step_check import check_fast_engine, check_sample
from worker.training.train_state import LoopState, apply_loop_state, capture_rng, restore_rng, trainable_parameters


@dataclass(frozen=True, slots=True)
class StepInfo:
    """Progress after one optimizer step (what `on_step` receives)."""

    step: int  # 1-based, across epochs
    total_steps: int
    epoch: int  # 1-based
    epochs: int
    loss: float | None  # this step's mean loss; read back only at logging steps
    learning_rate: float  # the rate this step used
    grad_norm: float | None  # before clipping; same rule as `loss`
    accuracy: float | None  # fraction of loss tokens predicted right (argmax); same rule, None where not computed
    tokens_per_second: float  # real tokens since the loop started / seconds since then
    eta_seconds: float | None  # smoothed (worker.training.eta); None while the rate is not known yet
    elapsed_s: float  # seconds in the loop so far, across every session of a resumed run
    num_tokens: int  # real tokens in this step
    metrics: dict[str, float] | None = None  # the step's further figures (DPO's reward margin); as `loss`


@dataclass(slots=True)
class LoopResult:
    steps_done: int
    stopped: bool  # should_stop() ended the loop early
    final_loss: float | None  # loss of the last step done (None when no step ran)
    logged_losses: list[tuple[int, float]] = field(default_factory=list)
    total_tokens: int = 0
    elapsed_s: float = 0.0  # across every session of a resumed run
    paused: bool = False  # the stop was a pause (pause_requested() said so); the state was saved


def batch_order(num_examples: int, batch_size: int, epoch: int, seed: int, *, shuffle: bool = True) -> list[list[int]]:
    """The (shuffled) batches of one epoch (1-based), reproducible from `seed`."""
    order = list(range(num_examples))
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, num_examples, batch_size)]


def linear_decay(base_lr: float, step: int, total_steps: int) -> float:
    """Learning rate for 1-based `step`: from `base_lr` at step 1 linearly towards 0, no warmup."""
    return base_lr * max(0.0, (total_steps - step + 1) / total_steps)


@dataclass(frozen=True, slots=True)
class LoopPlan:
    """The numbers that shape a loop: what to train for, how fast, how often to look."""

    epochs: int
    batch_size: int  # sequences per optimizer step (the last step of an epoch may hold fewer)
    learning_rate: float  # the peak: linear decay from it to 0, no warmup
    seed: int = 0  # the batch order and torch's RNG
    max_grad_norm: float = 1.0
    log_every: int = 1  # steps between read-backs of loss, grad norm and accuracy (each is a host sync)
    shuffle: bool = True  # False takes the examples in order every epoch (benchmarks)
    compile: bool | None = None  # torch.compile of the fast engine's decoder layers; None: where it pays (speedups)
    cuda_graphs: bool | None = None  # whole-step CUDA graph capture (fast engine); None: where it pays (speedups)
    check_first_step: bool | None = None  # fast vs reference loss on the first batch (step_check); None: on CUDA
    state_every: int = 0  # steps between state saves (0: off; saves at exact steps, for tests)
    state_every_s: float = 0.0  # seconds between state saves (0: off); both may be set; see `train_loop`

    @classmethod
    def of_run(
        cls, config: TrainConfig, device: torch.device, *, state_every: int = 0, state_every_s: float = 0.0
    ) -> LoopPlan:
        """A job's plan: its config, reading the loss back every step on a CPU and every 10th on a GPU."""
        return cls(
            epochs=config.epochs, batch_size=config.batch_size, learning_rate=config.learning_rate,
            seed=config.seed, log_every=config.log_every or (10 if device.type == "cuda" else 1),
            compile=config.compile, cuda_graphs=config.compile, state_every=state_every,
            state_every_s=state_every_s,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class LoopHooks:
    """What the loop reports to its run (each optional)."""

    on_step: Callable[[StepInfo], None] | None = None
    # (epoch, mean loss, mean token accuracy) after each epoch that ran to its end; None where not computed.
    on_epoch_end: Callable[[int, float | None, float | None], None] | None = None
    save_state: StateSaver | None = None  # None: the loop saves no state


def train_loop(
    model: nn.Module,
    examples: Sequence[Example] | Sequence[Any],
    plan: LoopPlan,
    *,
    device: torch.device,
    engine: EngineKind = "fast",
    control: RunControl | None = None,
    hooks: LoopHooks | None = None,
    resume: LoopState | None = None,
    step_fn: AnyStepFn | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> LoopResult:
    """Train `model`'s trainable parameters on `examples` by `plan`; see the module docstring.

    `control.should_stop()` is asked before every step; fallbacks of the fast engine (compilation,
    capture) are reported through `control.emit`. `hooks.on_epoch_end` gets the means of that epoch's
    step losses and token accuracies.

    `resume` continues a run from a saved `LoopState` (same examples, epochs, batch size, seed):
    the steps that follow are those an uninterrupted run would have taken. `hooks.save_state` is
    handed the loop's state after each epoch end (after `on_epoch_end`); between them, every
    `plan.state_every` steps and once `plan.state_every_s` seconds of `clock` passed since the last
    save (taken at the first step after that at which the saver is idle: a time-triggered save never
    waits for the previous write); and when `should_stop()` ends the loop while
    `control.pause_requested()` says the stop is a pause (`LoopResult.paused`): that save is flushed
    before the loop returns. Other saves may still be being written when it returns: whoever made the
    saver waits for them (`StateWriter.close`).

    `step_fn` replaces the engine's step (DPO's `worker.training.dpo.DpoStep`, over whatever `examples`
    holds: preference pairs); it runs eagerly, with the same optimizer, schedule and clipping.
    """
    control = control or LocalControl()
    hooks = hooks or LoopHooks()
    epochs, batch_size, state_every, saver = plan.epochs, plan.batch_size, plan.state_every, hooks.save_state
    if not examples:
        raise ValueError("no examples to train on")
    if epochs < 1 or batch_size < 1 or plan.log_every < 1 or state_every < 0 or plan.state_every_s < 0:
        raise ValueError("epochs, batch_size and log_every must be >= 1, state_every and state_every_s >= 0")
    torch.manual_seed(plan.seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    steps_per_epoch = math.ceil(len(examples) / batch_size)
    total_steps = epochs * steps_per_epoch
    result = LoopResult(steps_done=0, stopped=False, final_loss=None)
    pos = _Position() if resume is None else _Position.restored(resume, device)
    speedups = None
    if step_fn is None and engine == "fast":
        remaining = _job_batches(len(examples), plan, pos)
        engine = _checked_engine(model, examples, remaining, plan, device=device, control=control)
        if engine == "fast":
            speedups = _plan_speedups(model, examples, remaining, plan, device=device, control=control)
    train_step = _make_train_step(model, params, plan, engine=engine, device=device, on_event=control.emit,
                                  step_fn=step_fn, speedups=speedups)  # fmt: skip
    if resume is not None:
        # After the model and optimizer are built (building may draw random numbers), before step one.
        apply_loop_state(model, train_step.optimizer, resume, total_steps)
        restore_rng(resume.rng, device)
        result.steps_done, result.total_tokens = resume.step, resume.total_tokens
        result.logged_losses, result.final_loss = list(resume.logged_losses), resume.final_loss
    start = time.perf_counter() - (resume.elapsed_s if resume is not None else 0.0)  # elapsed spans sessions
    # Per session (a resumed run's first steps warm up again); timed at the logging steps, which sync.
    eta = EtaEstimator(total_steps, log_every=plan.log_every)

    def snapshot() -> LoopState:
        last = float(pos.last_loss) if pos.last_loss is not None else result.final_loss
        return LoopState(
            step=result.steps_done, epoch=pos.epoch, batch_index=pos.batch_index, total_steps=total_steps,
            total_tokens=result.total_tokens, epoch_loss_sum=pos.loss_sum, epoch_steps=pos.epoch_steps,
            epoch_accuracy_sum=pos.accuracy_sum,
            final_loss=last, logged_losses=list(result.logged_losses), elapsed_s=time.perf_counter() - start,
            params=dict(trainable_parameters(model)), optimizer=train_step.optimizer.state_dict(),
            rng=capture_rng(device),
        )  # fmt: skip

    last_save = clock()

    def save(saver: StateSaver) -> None:
        nonlocal last_save
        saver.save(snapshot())
        last_save = clock()

    def periodic_save_due(saver: StateSaver, step: int) -> bool:
        if state_every and step % state_every == 0:
            return True  # exact steps: waits for a write in flight
        return 0 < plan.state_every_s <= clock() - last_save and saver.idle()

    while pos.epoch <= epochs:
        batches = batch_order(len(examples), batch_size, pos.epoch, plan.seed, shuffle=plan.shuffle)
        while pos.batch_index < len(batches):
            if control.should_stop():
                result.stopped = True
                result.paused = control.pause_requested()
                if result.paused and saver is not None:
                    save(saver)
                    saver.flush()  # the job reports paused next: its state must be on disk
                break
            step = result.steps_done + 1
            lr = linear_decay(plan.learning_rate, step, total_steps)
            out = train_step([examples[i] for i in batches[pos.batch_index]], lr)
            pos.add(out.loss, out.accuracy)
            result.steps_done = step
            result.total_tokens += out.num_tokens
            logging_step = step % plan.log_every == 0 or step == total_steps
            loss_value, grad_norm, accuracy = _read_back(out) if logging_step else (None, None, None)
            if loss_value is not None:
                result.logged_losses.append((step, loss_value))
            if hooks.on_step is not None:
                now = time.perf_counter()
                elapsed = now - start
                hooks.on_step(
                    StepInfo(
                        step=step,
                        total_steps=total_steps,
                        epoch=pos.epoch,
                        epochs=epochs,
                        loss=loss_value,
                        learning_rate=lr,
                        grad_norm=grad_norm,
                        accuracy=accuracy,
                        tokens_per_second=result.total_tokens / elapsed if elapsed > 0 else 0.0,
                        eta_seconds=eta.update(step, now),
                        elapsed_s=elapsed,
                        num_tokens=out.num_tokens,
                        metrics={k: float(v) for k, v in out.metrics.items()} if logging_step and out.metrics else None,
                    )
                )
            # A step that ends the epoch is saved after the epoch end, below.
            if saver is not None and pos.batch_index < len(batches) and periodic_save_due(saver, step):
                save(saver)
        if result.stopped:
            break  # a cut-short epoch gets no on_epoch_end
        if hooks.on_epoch_end is not None:
            mean = None if pos.loss_sum is None else float(pos.loss_sum) / pos.epoch_steps
            mean_accuracy = None if pos.accuracy_sum is None else float(pos.accuracy_sum) / pos.epoch_steps
            hooks.on_epoch_end(pos.epoch, mean, mean_accuracy)
        pos.next_epoch()
        if saver is not None:
            save(saver)
    if pos.last_loss is not None:
        result.final_loss = float(pos.last_loss)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if isinstance(train_step, StaticTrainStep) and train_step.compiled and train_step.compile_checked:
        mark_compiled(compile_cache_key(unwrap(model)))  # the next job of this shape compiles from the cache
    result.elapsed_s = time.perf_counter() - start
    return result


@dataclass(slots=True)
class _Position:
    """Where the loop is in the data, and the current epoch's losses (device tensors, read at its end)."""

    epoch: int = 1
    batch_index: int = 0  # the next batch of the epoch
    loss_sum: torch.Tensor | None = None
    epoch_steps: int = 0
    last_loss: torch.Tensor | None = None  # this session's last step; the saved final loss covers the rest
    accuracy_sum: torch.Tensor | None = None  # the epoch's summed token accuracies (None: none computed)

    @classmethod
    def restored(cls, state: LoopState, device: torch.device) -> _Position:
        loss_sum = None if state.epoch_loss_sum is None else state.epoch_loss_sum.to(device)
        accuracy_sum = None if state.epoch_accuracy_sum is None else state.epoch_accuracy_sum.to(device)
        return cls(state.epoch, state.batch_index, loss_sum, state.epoch_steps, accuracy_sum=accuracy_sum)

    def add(self, loss: torch.Tensor, accuracy: torch.Tensor | None) -> None:
        self.batch_index += 1
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        if accuracy is not None:
            self.accuracy_sum = accuracy if self.accuracy_sum is None else self.accuracy_sum + accuracy
        self.epoch_steps += 1
        self.last_loss = loss

    def next_epoch(self) -> None:
        self.epoch, self.batch_index, self.loss_sum, self.epoch_steps = self.epoch + 1, 0, None, 0
        self.accuracy_sum = None


def _make_train_step(
    model: nn.Module,
    params: list[nn.Parameter],
    plan: LoopPlan,
    *,
    engine: EngineKind,
    device: torch.device,
    on_event: EventFn,
    step_fn: AnyStepFn | None = None,
    speedups: SpeedupPlan | None = None,
) -> TrainStep:
    lr, clip = plan.learning_rate, plan.max_grad_norm
    if step_fn is not None:
        return EagerTrainStep(step_fn, make_optimizer(params, lr, device, capturable=False), params, clip)
    if engine == "fast" and speedups is not None and (speedups.compile or speedups.cuda_graphs):
        optimizer = make_optimizer(params, lr, device, capturable=speedups.cuda_graphs)
        return StaticTrainStep(
            model, optimizer, params, device=device, max_sequences=plan.batch_size, max_grad_norm=clip,
            compile=speedups.compile, cuda_graphs=speedups.cuda_graphs, on_event=on_event,
            expected=speedups.expected if plan.cuda_graphs is None else None,
        )  # fmt: skip
    optimizer = make_optimizer(params, lr, device, capturable=False)
    return EagerTrainStep(make_step_fn(model, kind=engine, device=device), optimizer, params, clip)


def _job_batches(num_examples: int, plan: LoopPlan, pos: _Position) -> list[list[int]]:
    """Every batch the loop will still run, in order (from `pos`, a resumed run's position)."""
    batches: list[list[int]] = []
    for epoch in range(pos.epoch, plan.epochs + 1):
        order = batch_order(num_examples, plan.batch_size, epoch, plan.seed, shuffle=plan.shuffle)
        batches.extend(order[pos.batch_index :] if epoch == pos.epoch else order)
    return batches


def _checked_engine(model: nn.Module, examples: Sequence[Example], batches: list[list[int]], plan: LoopPlan, *,
                    device: torch.device, control: RunControl) -> EngineKind:  # fmt: skip
    """ "fast", unless the fast step's loss on the first batch disagrees with the reference's (then "reference")."""
    check = device.type == "cuda" if plan.check_first_step is None else plan.check_first_step
    if not check or not batches:
        return "fast"
    try:
        result = check_fast_engine(model, check_sample([examples[i] for i in batches[0]]), device)
    except Exception as exc:  # a kernel that cannot even run here: the reference engine can
        control.emit(events.warning(component="engine_check", engine="reference"),
                     f"the fast engine failed on the first batch ({type(exc).__name__}: {exc}); "
                     "training on the reference engine")  # fmt: skip
        return "reference"
    if result.agrees:
        control.emit(events.info(component="engine_check", engine="fast", fast_loss=result.fast_loss,
                                 reference_loss=result.reference_loss),
                     f"first batch checked: {result.describe()}; training on the fast engine")  # fmt: skip
        return "fast"
    control.emit(events.warning(component="engine_check", engine="reference", fast_loss=result.fast_loss,
                                reference_loss=result.reference_loss),
                 f"the fast engine disagrees with the reference on the first batch: {result.describe()}; "
                 "training on the reference engine")  # fmt: skip
    return "reference"


def _plan_speedups(model: nn.Module, examples: Sequence[Example], batches: list[list[int]], plan: LoopPlan, *,
                   device: torch.device, control: RunControl) -> SpeedupPlan:  # fmt: skip
    hf_model = unwrap(model)
    cached = device.type == "cuda" and compile_cached(compile_cache_key(hf_model))
    speedups = plan_speedups(hf_model, examples, batches, device=device,
                             compile=plan.compile, cuda_graphs=plan.cuda_graphs, compile_cached=cached)  # fmt: skip
    control.emit(events.info(component="speedups", compile=speedups.compile, cuda_graphs=speedups.cuda_graphs,
                             step_shapes=len(speedups.expected)), speedups.describe())  # fmt: skip
    return speedups


def _read_back(out: TrainStepOutput) -> tuple[float, float, float | None]:
    """Loss, grad norm and token accuracy of a logging step, in one device->host transfer (one sync)."""
    values = [out.loss.float(), out.grad_norm.float()]
    if out.accuracy is not None:
        values.append(out.accuracy.float())
    read = torch.stack(values).tolist()
    return read[0], read[1], read[2] if out.accuracy is not None else None
