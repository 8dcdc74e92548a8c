"""The training loop every job runs: AdamW + linear decay + clipping over an engine's step function.

`batch_size` sequences make one optimizer step (the last step of an epoch may hold fewer). The
loop never reads a device value back except at logging steps (loss, grad norm, token accuracy: one
transfer), at epoch ends (the epoch's mean loss and accuracy) and once at the end, so the GPU is
never made to wait in between.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from worker.attention import EngineKind
from worker.example import Example
from worker.step import make_step_fn
from worker.train_step import EagerTrainStep, EventFn, StaticTrainStep, TrainStep, TrainStepOutput, make_optimizer


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
    eta_seconds: float
    num_tokens: int  # real tokens in this step


@dataclass(slots=True)
class LoopResult:
    steps_done: int
    stopped: bool  # should_stop() ended the loop early
    final_loss: float | None  # loss of the last step done (None when no step ran)
    logged_losses: list[tuple[int, float]] = field(default_factory=list)
    total_tokens: int = 0
    elapsed_s: float = 0.0


def batch_order(num_examples: int, batch_size: int, epoch: int, seed: int, *, shuffle: bool = True) -> list[list[int]]:
    """The (shuffled) batches of one epoch (1-based), reproducible from `seed`."""
    order = list(range(num_examples))
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, num_examples, batch_size)]


def linear_decay(base_lr: float, step: int, total_steps: int) -> float:
    """Learning rate for 1-based `step`: from `base_lr` at step 1 linearly towards 0, no warmup."""
    return base_lr * max(0.0, (total_steps - step + 1) / total_steps)


def train_loop(
    model: nn.Module,
    examples: Sequence[Example],
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    device: torch.device,
    seed: int = 0,
    engine: EngineKind = "fast",
    max_grad_norm: float = 1.0,
    log_every: int = 1,
    on_step: Callable[[StepInfo], None] | None = None,
    on_epoch_end: Callable[[int, float | None, float | None], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    shuffle: bool = True,
    compile: bool | None = None,
    cuda_graphs: bool | None = None,
    on_event: EventFn | None = None,
) -> LoopResult:
    """Train `model`'s trainable parameters on `examples`; see the module docstring.

    `on_epoch_end(epoch, mean_loss, mean_accuracy)` gets the means of that epoch's step losses and
    token accuracies (None where the engine computed none), after each epoch that ran to its end.
    `should_stop()` is asked before every step. ``shuffle=False`` takes the examples in order every
    epoch (benchmarks). `compile` (``torch.compile`` of the decoder
    layers on static bucketed shapes) and `cuda_graphs` (whole-step capture) apply to the fast
    engine; None means on for CUDA, off elsewhere. Fallbacks are reported through `on_event`.
    """
    if not examples:
        raise ValueError("no examples to train on")
    if epochs < 1 or batch_size < 1 or log_every < 1:
        raise ValueError("epochs, batch_size and log_every must be >= 1")
    torch.manual_seed(seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    train_step = _make_train_step(
        model, params, engine=engine, device=device, learning_rate=learning_rate, batch_size=batch_size,
        max_grad_norm=max_grad_norm, compile=compile, cuda_graphs=cuda_graphs, on_event=on_event,
    )  # fmt: skip
    steps_per_epoch = math.ceil(len(examples) / batch_size)
    total_steps = epochs * steps_per_epoch
    result = LoopResult(steps_done=0, stopped=False, final_loss=None)
    last_loss: torch.Tensor | None = None
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        epoch_loss_sum: torch.Tensor | None = None
        epoch_accuracy_sum: torch.Tensor | None = None
        epoch_steps = 0
        for indices in batch_order(len(examples), batch_size, epoch, seed, shuffle=shuffle):
            if should_stop is not None and should_stop():
                result.stopped = True
                break
            step = result.steps_done + 1
            lr = linear_decay(learning_rate, step, total_steps)
            out = train_step([examples[i] for i in indices], lr)
            result.steps_done = step
            result.total_tokens += out.num_tokens
            last_loss = out.loss
            epoch_loss_sum = out.loss if epoch_loss_sum is None else epoch_loss_sum + out.loss
            if out.accuracy is not None:
                epoch_accuracy_sum = out.accuracy if epoch_accuracy_sum is None else epoch_accuracy_sum + out.accuracy
            epoch_steps += 1
            logging_step = step % log_every == 0 or step == total_steps
            loss_value, grad_norm, accuracy = _read_back(out) if logging_step else (None, None, None)
            if loss_value is not None:
                result.logged_losses.append((step, loss_value))
            if on_step is not None:
                elapsed = time.perf_counter() - start
                on_step(
                    StepInfo(
                        step=step,
                        total_steps=total_steps,
                        epoch=epoch,
                        epochs=epochs,
                        loss=loss_value,
                        learning_rate=lr,
                        grad_norm=grad_norm,
                        accuracy=accuracy,
                        tokens_per_second=result.total_tokens / elapsed if elapsed > 0 else 0.0,
                        eta_seconds=elapsed / step * (total_steps - step),
                        num_tokens=out.num_tokens,
                    )
                )
        if result.stopped:
            break  # a cut-short epoch gets no on_epoch_end
        if on_epoch_end is not None:
            mean = None if epoch_loss_sum is None else float(epoch_loss_sum) / epoch_steps
            mean_accuracy = None if epoch_accuracy_sum is None else float(epoch_accuracy_sum) / epoch_steps
            on_epoch_end(epoch, mean, mean_accuracy)
    if last_loss is not None:
        result.final_loss = float(last_loss)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    result.elapsed_s = time.perf_counter() - start
    return result


def _read_back(out: TrainStepOutput) -> tuple[float, float, float | None]:
    """Loss, grad norm and token accuracy of a logging step, in one device->host transfer (one sync)."""
    values = [out.loss.float(), out.grad_norm.float()]
    if out.accuracy is not None:
        values.append(out.accuracy.float())
    read = torch.stack(values).tolist()
    return read[0], read[1], read[2] if out.accuracy is not None else None


def _make_train_step(
    model: nn.Module,
    params: list[nn.Parameter],
    *,
    engine: EngineKind,
    device: torch.device,
    learning_rate: float,
    batch_size: int,
    max_grad_norm: float,
    compile: bool | None,
    cuda_graphs: bool | None,
    on_event: EventFn | None,
) -> TrainStep:
    on_cuda = device.type == "cuda"
    use_compile = on_cuda if compile is None else compile
    use_graphs = on_cuda if cuda_graphs is None else cuda_graphs and on_cuda
    if engine == "fast" and (use_compile or use_graphs):
        optimizer = make_optimizer(params, learning_rate, device, capturable=use_graphs)
        return StaticTrainStep(
            model, optimizer, params, device=device, max_sequences=batch_size, max_grad_norm=max_grad_norm,
            compile=use_compile, cuda_graphs=use_graphs, on_event=on_event,
        )  # fmt: skip
    optimizer = make_optimizer(params, learning_rate, device, capturable=False)
    return EagerTrainStep(make_step_fn(model, kind=engine, device=device), optimizer, params, max_grad_norm)
