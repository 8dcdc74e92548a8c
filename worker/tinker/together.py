"""Several clients' forward or forward_backward calls in one packed step over their shared base.

Clients on one hosting job share the frozen base (`worker.tinker.host`); each has its own LoRA adapter. Their
calls are packed into one row, so the base's weights are read once for all of them. Each LoRA layer is routed
for the step: its adapters are switched off (the layer computes the base alone) and a forward hook adds, to
each client's stretch of the row, that client's adapter's delta: all clients' in two matmuls, their A and B
matrices stacked and a mask keeping each token to its own client's columns (`Routing`, `_stacked_delta`). The LM head's rows are taken one
client at a time through `RoutedHead`, which sets the head's adapter before every call, so the chunks that
activation checkpointing recomputes in the backward are recomputed with the right adapter too. One backward
of the summed losses sends each adapter the gradient of its own client's loss alone: the losses, gradients and
outputs are those of the calls run one by one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from shared.tinker_ops import ForwardOp, ForwardResult
from worker.tinker.losses import bearing_rows, elementwise_loss
from worker.training.example import IGNORE_INDEX, Example
from worker.training.forward_backward import _peft_tuner_layers, unwrap
from worker.training.packing import pack_examples

if TYPE_CHECKING:
    from worker.tinker.trainer import TinkerTrainer


@dataclass
class Routing:
    """Which adapter each stretch of the packed row runs (in order, covering it), and the head's adapter now."""

    token_segments: list[tuple[str, int]] = field(default_factory=list)  # (adapter, tokens)
    row_adapter: str | None = None
    _masks: dict[tuple[tuple[str, int, float], ...], torch.Tensor] = field(default_factory=dict)

    def mask(self, columns: tuple[tuple[str, int, float], ...], device: torch.device) -> torch.Tensor:
        """(tokens, total rank): each token's own adapter's rank columns hold that adapter's scaling, the other
        adapters' columns 0. `columns`: the layer's adapters in order, with their rank and scaling. The same for
        every layer adapting the same clients, so made once a step."""
        mask = self._masks.get(columns)
        if mask is None:
            total = sum(n for _, n in self.token_segments)
            mask = torch.zeros(total, sum(rank for _, rank, _ in columns), dtype=torch.float32)
            start = {name: sum(rank for _, rank, _ in columns[:i]) for i, (name, _, _) in enumerate(columns)}
            widths = {name: (rank, scaling) for name, rank, scaling in columns}
            offset = 0
            for adapter, n in self.token_segments:
                if adapter in widths:  # a client that does not adapt this layer adds nothing to it
                    rank, scaling = widths[adapter]
                    mask[offset : offset + n, start[adapter] : start[adapter] + rank] = scaling
                offset += n
            mask = self._masks[columns] = mask.to(device)
        return mask


def _delta(layer: Any, adapter: str, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    lora_a = layer.lora_A[adapter]
    x = layer._cast_input_dtype(x, lora_a.weight.dtype)
    return (layer.lora_B[adapter](lora_a(x)) * layer.scaling[adapter]).to(dtype)


def _stacked_delta(layer: Any, routing: Routing, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Every client's LoRA delta over the packed row in two matmuls: the clients' A stacked, masked so that each
    token keeps its own client's rank columns (scaled), then the clients' B stacked. The masked columns carry no
    gradient, so each adapter's gradient comes from its own client's tokens alone."""
    names = [adapter for adapter in dict.fromkeys(a for a, _ in routing.token_segments) if adapter in layer.lora_A]
    if not names:
        return x.new_zeros(())
    a = torch.cat([layer.lora_A[n].weight for n in names]) if len(names) > 1 else layer.lora_A[names[0]].weight
    b = torch.cat([layer.lora_B[n].weight for n in names], 1) if len(names) > 1 else layer.lora_B[names[0]].weight
    columns = tuple((n, int(layer.lora_A[n].weight.shape[0]), float(layer.scaling[n])) for n in names)
    mask = routing.mask(columns, x.device)
    low = layer._cast_input_dtype(x, a.dtype) @ a.t()
    return ((low * mask.to(low.dtype)) @ b.t()).to(dtype)


def _hook(routing: Routing) -> Any:
    def add_deltas(layer: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        if x.dim() == 2:  # the LM head's rows: one client's at a time
            adapter = routing.row_adapter
            if adapter is None or adapter not in layer.lora_A:
                return output
            return output + _delta(layer, adapter, x, output.dtype)
        return output + _stacked_delta(layer, routing, x, output.dtype)

    return add_deltas


@contextlib.contextmanager
def routed(model: nn.Module, routing: Routing) -> Iterator[None]:
    """Route every LoRA layer of `model` by `routing` (see the module docstring) until the block ends."""
    layers: list[Any] = [m for m in _peft_tuner_layers(unwrap(model)) if hasattr(m, "lora_A")]
    handles, before = [], []
    hook = _hook(routing)
    try:
        for layer in layers:
            before.append(layer._disable_adapters)
            layer._disable_adapters = True
            handles.append(layer.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for layer, disabled in zip(layers, before, strict=False):
            layer._disable_adapters = disabled


class RoutedHead(nn.Module):
    """The LM head, run with one client's adapter: the routing is set on every call (recomputes included)."""

    def __init__(self, head: nn.Module, routing: Routing, adapter: str) -> None:
        super().__init__()
        self.head, self.routing, self.adapter = head, routing, adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.routing.row_adapter = self.adapter
        out: torch.Tensor = self.head(x)
        return out


def forward_together(calls: Sequence[tuple[TinkerTrainer, ForwardOp]]) -> list[ForwardResult]:
    """Run every client's call (all forward, or all forward_backward) in one packed step; one result each."""
    first = calls[0][0]
    fast = first.fast
    kinds = {op.op for _, op in calls}
    if fast is None or len(kinds) != 1 or any(t.model is not first.model or t.fast is not fast for t, _ in calls):
        raise ValueError("only calls of one kind, from clients sharing one packed engine, run together")
    backward = kinds == {"forward_backward"}
    prepared = []
    examples: list[Example] = []
    routing = Routing()
    for trainer, op in calls:
        trainer._check(op.data)
        mine = [Example(d.tokens + d.target_tokens[-1:], [IGNORE_INDEX, *d.target_tokens]) for d in op.data]
        examples.extend(mine)
        routing.token_segments.append((trainer.adapter, sum(len(e.input_ids) for e in mine)))
        prepared.append((trainer, op, trainer._loss_inputs(op), [len(d.tokens) for d in op.data]))
        for param in trainer.params:
            param.requires_grad_(True)
    packed = pack_examples(examples)
    step_inputs = fast.inputs(packed, static=False)
    outcomes = []
    with routed(first.model, routing), torch.set_grad_enabled(backward):
        with fast.forward_context():
            hidden = fast.hidden_states(step_inputs)
            rows = hidden.index_select(0, step_inputs.loss_rows)
            offset = 0
            total: torch.Tensor | None = None
            for trainer, op, inputs, lengths in prepared:
                n = sum(lengths)
                mask = bearing_rows(op.loss_fn, inputs) if backward else None
                head = RoutedHead(trainer.head, routing, trainer.adapter)
                logprobs = trainer._head_logprobs(rows[offset : offset + n], step_inputs.targets[offset : offset + n],
                                                  mask, head=head)  # fmt: skip
                offset += n
                terms = elementwise_loss(op.loss_fn, logprobs, inputs, op.loss_fn_config)
                loss = terms.sum()
                total = loss if total is None else total + loss
                outcomes.append((logprobs, terms, loss, lengths))
        if backward and total is not None and total.requires_grad:
            total.backward()  # inside the routing: checkpointed chunks recompute with their own adapters
    return [first._result(lp, terms, loss, lengths) for lp, terms, loss, lengths in outcomes]
