"""One optimizer step: forward + backward, clipping, AdamW. Eager, or static shapes captured whole.

`EagerTrainStep` runs a step function then clips and steps the optimizer. `StaticTrainStep` is the
default on CUDA for the fast engine: each step's sequences are packed into bucketed shapes
(`worker.training.packing.pack_static`), the decoder layers are compiled for those shapes
(``torch.compile(dynamic=False)``), and the whole step -- forward, backward, gradient clipping and
a capturable fused AdamW -- is captured once per shape as a CUDA graph and replayed after that. A
step at this model size is bound by the ~9k kernel launches Python issues, not by arithmetic, and
replaying a graph issues them all at once.

The first step of each shape runs eagerly (a real training step that also compiles and allocates
gradients and optimizer state); the second is captured. Anything that fails in compilation or
capture switches that piece off for the rest of the run and reports a warning through
`on_event`: the run goes on eagerly, never stops because of a speed-up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from shared import events
from shared.events import EventPayload
from worker.training.example import Example
from worker.training.forward_backward import FastStep, StepFn, StepInputs, StepOutput, unwrap
from worker.training.packing import pack_static

log = logging.getLogger(__name__)

EventFn = Callable[[EventPayload, str], None]  # (typed payload, message): shared.events
_BodyOut = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # loss, grad norm, token accuracy
AnyStepFn = Callable[[Sequence[Any]], StepOutput]  # a step over items other than examples (DPO's pairs)
MAX_GRAPHS = 48  # captured shapes kept; steps of further shapes run eagerly (bounded memory)


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


class StaticTrainStep:
    """Bucketed static shapes, compiled layers, whole-step CUDA graphs; each with an eager fallback."""

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
    ) -> None:
        if cuda_graphs and device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        hf_model = unwrap(model)
        self.fast = FastStep(hf_model, device, kernel=kernel, captured=cuda_graphs)
        self.optimizer, self.params, self.max_grad_norm = optimizer, params, max_grad_norm
        self.device, self.max_sequences = device, max_sequences
        self.on_event = on_event
        self.graphs_on = cuda_graphs
        self.graphs: dict[tuple[int, int], _Captured] = {}
        self.warmed: set[tuple[int, int]] = set()
        self.pool = torch.cuda.graph_pool_handle() if cuda_graphs else None
        self.layers = _decoder_layers(hf_model)
        self.compiled = False
        if compile:
            self._compile()

    # ----------------------------------------------------------------- the step

    def __call__(self, examples: Sequence[Example], lr: float) -> TrainStepOutput:
        packed = pack_static(examples, max_sequences=self.max_sequences)
        key = (len(packed.input_ids), len(packed.targets))
        inputs = self.fast.inputs(packed, static=True)
        set_lr(self.optimizer, lr)
        captured = self.graphs.get(key)
        if captured is None and self.graphs_on and key in self.warmed and len(self.graphs) < MAX_GRAPHS:
            captured = self._capture(key, inputs)
        if captured is not None:
            captured.inputs.copy_from(inputs)
            captured.graph.replay()
            loss, grad_norm = captured.loss.clone(), captured.grad_norm.clone()  # the next replay overwrites them
            accuracy = None if captured.accuracy is None else captured.accuracy.clone()
        else:
            loss, grad_norm, accuracy = self._warm_or_eager(inputs)
            self.warmed.add(key)
        return TrainStepOutput(loss, grad_norm, packed.num_tokens, packed.num_loss_tokens, accuracy)

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
        try:
            return self._run_eager(inputs)
        except Exception as exc:
            if not self.compiled:
                raise
            self._uncompile(f"the compiled step failed ({type(exc).__name__}: {exc}); continuing uncompiled")
            return self._run_eager(inputs)

    def _run_eager(self, inputs: StepInputs) -> _BodyOut:
        if not self.graphs_on:
            return self._body(inputs)
        # Graph capture wants warm-up work on a side stream; the gradients it allocates stay for capture.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            result = self._body(inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        return result

    def _capture(self, key: tuple[int, int], example_inputs: StepInputs) -> _Captured | None:
        static = StepInputs(
            **{name: getattr(example_inputs, name).clone() for name in _TENSOR_FIELDS},
            max_len=example_inputs.max_len,
            seq_lens=None,
        )
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                loss, grad_norm, accuracy = self._body(static)
        except Exception as exc:
            self.graphs_on = False
            self.graphs.clear()
            self._warn(f"CUDA graph capture failed ({type(exc).__name__}: {exc}); continuing without graphs")
            return None
        captured = _Captured(graph, static, loss, grad_norm, accuracy)
        self.graphs[key] = captured
        return captured

    # ----------------------------------------------------------------- compile

    def _compile(self) -> None:
        # One compiled graph per bucket shape; the default limit (8) would leave later buckets eager.
        dynamo_config = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(getattr(dynamo_config, name), 2 * MAX_GRAPHS))
        try:
            for layer in self.layers:
                layer.compile(dynamic=False)
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


def _decoder_layers(hf_model: Any) -> list[nn.Module]:
    layers = getattr(hf_model.get_decoder(), "layers", None)
    return list(layers) if layers is not None else []
