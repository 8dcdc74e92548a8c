"""One optimizer step: forward + backward, clipping, AdamW. Eager, or static shapes captured whole.

`EagerTrainStep` runs a step function then clips and steps the optimizer. `StaticTrainStep` is the
fast engine's step where compiling or capturing pays (`worker.training.speedups` decides per job):
each step's sequences are packed into bucketed shapes (`worker.training.packing.pack_static`), the
decoder layers are compiled once with a dynamic token dimension (one compile serves every bucket), and
the whole step -- forward, backward, gradient clipping and a capturable fused AdamW -- is captured as
a CUDA graph per bucket shape and replayed after that. A step at this model size is bound by the ~9k
kernel launches Python issues, not by arithmetic, and replaying a graph issues them all at once.

The first step of each shape runs eagerly (a real training step that also compiles and allocates
gradients and optimizer state); a later one is captured when the shape repays it (`GraphCache`).
The first compiled step and each graph's first replay are compared with the same step run eagerly
(`worker.training.step_check`). Anything that fails or disagrees switches off only what failed --
compilation for the run, or that one shape's graph -- and reports a warning through `on_event`: the
run goes on, never stops because of a speed-up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from shared import events
from shared.events import EventPayload
from worker.training.example import Example
from worker.training.forward_backward import FastStep, StepFn, StepInputs, StepOutput, decoder_layers, unwrap
from worker.training.graph_cache import GraphCache, Key
from worker.training.packing import pack_static
from worker.training.step_check import Tolerance, packed_eval_loss, uncompiled

log = logging.getLogger(__name__)

EventFn = Callable[[EventPayload, str], None]  # (typed payload, message): shared.events
_BodyOut = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # loss, grad norm, token accuracy
AnyStepFn = Callable[[Sequence[Any]], StepOutput]  # a step over items other than examples (DPO's pairs)
MAX_GRAPHS = 48  # captured shapes kept (the most used; `GraphCache`): the rest run eagerly (bounded memory)


@dataclass(frozen=True, slots=True)
class TrainStepOutput:
    loss: torch.Tensor  # 0-dim, on the device: the step's mean loss
    grad_norm: torch.Tensor  # 0-dim, on the device: before clipping
    num_tokens: int
    num_loss_tokens: int
    accuracy: torch.Tensor | None = None  # 0-dim, on the device: the step's token accuracy; None: not computed
    metrics: dict[str, torch.Tensor] | None = None  # the step function's further figures, on the device


class TrainStep(Protocol):
    optimizer: Any  # AdamW (`make_optimizer`): its state is saved and restored with the run's

    def __call__(self, examples: Sequence[Any], lr: float) -> TrainStepOutput: ...


def make_optimizer(params: list[nn.Parameter], lr: float, device: torch.device, *, capturable: bool) -> Any:
    """AdamW without weight decay: fused on CUDA; capturable (a tensor learning rate) for CUDA graphs."""
    fused = device.type == "cuda" and all(p.is_cuda and p.is_floating_point() for p in params)
    if capturable:
        return torch.optim.AdamW(
            params, lr=torch.tensor(lr, device=device), weight_decay=0.0, fused=True, capturable=True
        )
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True if fused else None)


def set_lr(optimizer: Any, lr: float) -> None:
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)  # in place: a captured graph reads this tensor
        else:
            group["lr"] = lr


class EagerTrainStep:
    """Any step function (an engine's `StepFn` over examples, or `worker.training.dpo.DpoStep` over preference pairs)."""

    def __init__(
        self, step_fn: StepFn | AnyStepFn, optimizer: Any, params: list[nn.Parameter], max_grad_norm: float
    ) -> None:
        self.step_fn, self.optimizer, self.params, self.max_grad_norm = step_fn, optimizer, params, max_grad_norm

    def __call__(self, examples: Sequence[Any], lr: float) -> TrainStepOutput:
        set_lr(self.optimizer, lr)
        out = self.step_fn(examples)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return TrainStepOutput(
            out.loss, grad_norm.detach(), out.num_tokens, out.num_loss_tokens, out.accuracy, out.metrics
        )


@dataclass
class _Captured:
    graph: Any  # torch.cuda.CUDAGraph
    inputs: StepInputs
    loss: torch.Tensor
    grad_norm: torch.Tensor
    accuracy: torch.Tensor | None
    checked: bool = False  # its first replay was compared with the eager step


class StaticTrainStep:
    """Bucketed static shapes, compiled layers, whole-step CUDA graphs; each with an eager fallback.

    `expected` counts how many steps each (tokens, loss rows) shape will take in this job (the loop
    counts them before step one): graphs go to the shapes that repay a capture (`GraphCache`).
    `check` compares the first compiled step and each graph's first replay with the same step run
    eagerly (`worker.training.step_check`); on by default wherever compiling or capturing is.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any,
        params: list[nn.Parameter],
        *,
        device: torch.device,
        max_sequences: int,
        max_grad_norm: float,
        compile: bool,
        cuda_graphs: bool,
        on_event: EventFn | None = None,
        kernel: Any = "auto",
        expected: Mapping[Key, int] | None = None,
        check: bool = True,
    ) -> None:
        if cuda_graphs and device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        hf_model = unwrap(model)
        self.fast = FastStep(hf_model, device, kernel=kernel, captured=cuda_graphs)
        self.optimizer, self.params, self.max_grad_norm = optimizer, params, max_grad_norm
        self.device, self.max_sequences = device, max_sequences
        self.on_event = on_event
        self.graphs_on = cuda_graphs
        self.graphs: GraphCache[_Captured] = GraphCache(MAX_GRAPHS if cuda_graphs else 0, expected=expected)
        self.pool = torch.cuda.graph_pool_handle() if cuda_graphs else None
        # One side stream for every eager step before a capture: a new stream per step costs a
        # stream creation each time, and capture only asks that warm-up ran off the default stream.
        self.side_stream = torch.cuda.Stream(device) if cuda_graphs else None
        self.layers = decoder_layers(hf_model)
        self.compiled = False
        # A compiled or captured step runs in train mode and its check in eval mode: with attention
        # dropout on they compute different functions, so there is nothing exact to compare. (LoRA
        # dropout moves the loss only through a non-zero LoRA update: nothing on a new adapter's first
        # steps, where the checks run, and little after; the tolerance covers it.)
        dropout = float(getattr(hf_model.config, "attention_dropout", 0.0) or 0.0)
        self.check = check and dropout == 0.0
        if check and not self.check and (compile or cuda_graphs) and on_event is not None:
            on_event(events.info(component="train_step"), f"attention dropout {dropout}: compiled and captured "
                     "steps are not checked against the eager step (dropout makes them differ)")  # fmt: skip
        self.tolerance = Tolerance.for_dtype(self.fast.autocast)
        self.compile_checked = False
        if compile:
            self._compile()

    # ----------------------------------------------------------------- the step

    def __call__(self, examples: Sequence[Example], lr: float) -> TrainStepOutput:
        packed = pack_static(examples, max_sequences=self.max_sequences)
        key = (len(packed.input_ids), len(packed.targets))
        inputs = self.fast.inputs(packed, static=True)
        set_lr(self.optimizer, lr)
        self.graphs.count(key)
        captured = self.graphs.get(key)
        if captured is None and self.graphs_on and self.graphs.wants(key):
            captured = self._capture(key, inputs)
        if captured is not None:
            loss, grad_norm, accuracy = self._replay(key, captured, inputs)
        else:
            loss, grad_norm, accuracy = self._warm_or_eager(inputs)
        return TrainStepOutput(loss, grad_norm, packed.num_tokens, packed.num_loss_tokens, accuracy)

    def _replay(self, key: Key, captured: _Captured, inputs: StepInputs) -> _BodyOut:
        want = None if captured.checked or not self.check else self._eager_loss(inputs)
        captured.inputs.copy_from(inputs)
        captured.graph.replay()
        loss, grad_norm = captured.loss.clone(), captured.grad_norm.clone()  # the next replay overwrites them
        accuracy = None if captured.accuracy is None else captured.accuracy.clone()
        if want is not None:
            captured.checked = True
            got = float(loss.item())
            if not self.tolerance.agree(got, want):
                self.graphs.disable(key, "first replay disagreed with the eager step")
                self._warn(f"the CUDA graph of step shape {key} gave loss {self.tolerance.describe(got, want)} "
                           "against the eager step on the same batch; that shape runs eagerly from now on")  # fmt: skip
        return loss, grad_norm, accuracy

    def _body(self, inputs: StepInputs) -> _BodyOut:
        """What is captured: zero the gradients in place, forward + backward, clip, AdamW."""
        grads = [p.grad for p in self.params if p.grad is not None]  # none before the first step
        if grads:
            torch._foreach_zero_(grads)
        loss, accuracy = self.fast.forward_backward(inputs)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm, foreach=True)
        self.optimizer.step()
        return loss, grad_norm.detach(), accuracy

    def _warm_or_eager(self, inputs: StepInputs) -> _BodyOut:
        check_compile = self.compiled and self.check and not self.compile_checked
        want = self._eager_loss(inputs) if check_compile else None
        try:
            result = self._run_eager(inputs)
        except Exception as exc:
            if not self.compiled:
                raise
            self._uncompile(f"the compiled step failed ({type(exc).__name__}: {exc}); continuing uncompiled")
            return self._run_eager(inputs)
        if want is not None:
            self.compile_checked = True
            got = float(result[0].item())
            if not self.tolerance.agree(got, want):
                self._uncompile(f"the compiled step gave loss {self.tolerance.describe(got, want)} against the "
                                "uncompiled step on the same batch; continuing uncompiled")  # fmt: skip
        return result

    def _eager_loss(self, inputs: StepInputs) -> float:
        """This packed step's loss, eager and uncompiled, forward only: what a compiled or captured step must give."""
        with uncompiled(self.layers):
            return packed_eval_loss(self.fast, inputs)

    def _run_eager(self, inputs: StepInputs) -> _BodyOut:
        if self.side_stream is None:
            return self._body(inputs)
        # Graph capture wants warm-up work on a side stream; the gradients it allocates stay for capture.
        # The main stream waits for the side stream even when the step raises, so nothing that follows
        # (the eager retry, the next step) races the half-run one.
        side, main = self.side_stream, torch.cuda.current_stream(self.device)
        side.wait_stream(main)
        try:
            with torch.cuda.stream(side):
                return self._body(inputs)
        finally:
            main.wait_stream(side)

    def _capture(self, key: Key, example_inputs: StepInputs) -> _Captured | None:
        static = StepInputs(
            **{name: getattr(example_inputs, name).clone() for name in _TENSOR_FIELDS},
            max_len=example_inputs.max_len,
            seq_lens=None,
        )
        self.graphs.make_room()  # the least used graph goes; its memory returns to the pool
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                loss, grad_norm, accuracy = self._body(static)
        except Exception as exc:
            # Only this shape is given up: the graphs already captured were recorded before and still
            # replay correctly (each is checked against the eager step on its first replay).
            self.graphs.disable(key, f"capture failed ({type(exc).__name__})")
            self._warn(f"CUDA graph capture of step shape {key} failed ({type(exc).__name__}: {exc}); "
                       "that shape runs eagerly")  # fmt: skip
            return None
        captured = _Captured(graph, static, loss, grad_norm, accuracy)
        self.graphs.add(key, captured)
        return captured

    # ----------------------------------------------------------------- compile

    def _compile(self) -> None:
        # The token dimension is dynamic: one compile (forward and backward) serves every bucket, where
        # static shapes would compile once per bucket -- minutes for a job touching nine of them. The
        # recompile limit is raised anyway, so a guard that still specialises leaves no layer eager.
        dynamo_config = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(getattr(dynamo_config, name), 2 * MAX_GRAPHS))
        try:
            for layer in self.layers:
                layer.compile(dynamic=True)
        except Exception as exc:
            self._uncompile(f"torch.compile is unavailable ({type(exc).__name__}: {exc}); continuing uncompiled")
            return
        self.compiled = True

    def _uncompile(self, message: str) -> None:
        for layer in self.layers:
            layer._compiled_call_impl = None  # what nn.Module.compile() set
        self.compiled = False
        self._warn(message)

    def _warn(self, message: str) -> None:
        log.warning("%s", message)
        if self.on_event is not None:
            self.on_event(events.warning(component="train_step"), message)


_TENSOR_FIELDS = ("input_ids", "position_ids", "segment_ids", "cu_seqlens", "loss_rows", "targets", "loss_scale")
