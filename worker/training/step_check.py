"""Is a fast path computing the loss it should? Checked once on real batches, never assumed.

Nobody here has run the fast engine on every GPU, kernel build and compiler it may meet, so the
engine checks itself where a wrong result would otherwise go unnoticed:

- **The first step of a job** (`check_fast_engine`, on by default on a GPU): the fast step's loss on
  the job's first batch against the reference computation (padded batch, full logits) of the same
  batch and weights. Past `Tolerance`, the job trains on the reference engine with a warning.
- **The first compiled step and the first replay of each CUDA graph** (`worker.training.optimizer_step`):
  against the same packed step run eagerly and uncompiled. Past `Tolerance`, compilation is switched
  off, or that graph's shape stays eager, with a warning.

Each comparison runs the model in eval mode under ``no_grad`` (dropout off, so both sides compute the
same function; no gradients, no optimizer step) and reads one number back: once per job, and once per
compiled or captured shape, which is what makes it cheap enough to keep on.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from worker.training.evaluation import evaluate
from worker.training.example import Example
from worker.training.forward_backward import FastStep, StepInputs, unwrap
from worker.training.packing import pack_examples


@dataclass(frozen=True, slots=True)
class Tolerance:
    """How far two losses of the same batch may differ: ``|got - want| <= atol + rtol * |want|``.

    Half precision gets the wider band: packed and padded layouts sum in different orders in bf16,
    and a captured step (train mode) may still differ from its eval-mode check by LoRA dropout.
    A kernel that attends across packed sequences, reads stale inputs or drops a gradient's worth
    of the model moves a language-model loss by far more than this.
    """

    atol: float
    rtol: float

    @classmethod
    def for_dtype(cls, dtype: torch.dtype | None) -> Tolerance:
        if dtype in (torch.bfloat16, torch.float16):
            return cls(atol=2e-2, rtol=1e-2)
        return cls(atol=1e-4, rtol=1e-3)

    def agree(self, got: float, want: float) -> bool:
        return math.isfinite(got) and math.isfinite(want) and abs(got - want) <= self.atol + self.rtol * abs(want)

    def describe(self, got: float, want: float) -> str:
        return f"{got:.5f} vs {want:.5f} (tolerance {self.atol:g} + {self.rtol:g} x |reference|)"


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Dropout off for a check, each module's own training flag restored afterwards."""
    flags = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


@contextlib.contextmanager
def uncompiled(layers: Sequence[nn.Module]) -> Iterator[None]:
    """Run `layers` eagerly for a moment (``nn.Module.compile`` keeps the compiled call in ``_compiled_call_impl``)."""
    saved = [getattr(layer, "_compiled_call_impl", None) for layer in layers]
    for layer in layers:
        layer._compiled_call_impl = None
    try:
        yield
    finally:
        for layer, compiled in zip(layers, saved, strict=True):
            layer._compiled_call_impl = compiled


def packed_eval_loss(fast: FastStep, inputs: StepInputs) -> float:
    """The fast step's mean loss on `inputs`, forward only, in eval mode (one host read)."""
    with torch.no_grad(), eval_mode(fast.decoder, fast.head), fast.forward_context():
        hidden = fast.hidden_states(inputs)
        sums = fast.loss_sum(fast.head, hidden.index_select(0, inputs.loss_rows), inputs.targets)
    return float((sums.loss_sum * inputs.loss_scale).item())


CHECK_MAX_SEQUENCES = 4
CHECK_MAX_TOKENS = 2048  # the reference's full fp32 logits of this many tokens: ~1.2 GB at a 152k vocabulary


def check_sample(examples: Sequence[Example]) -> list[Example]:
    """The part of a batch the first-step check runs: its shortest sequences, at most `CHECK_MAX_SEQUENCES`
    and (beyond the first two) `CHECK_MAX_TOKENS`, so the reference's full logits never exhaust the memory a
    job sized for the fast engine leaves. Two or more sequences, where the batch has them: packing bugs
    show only where sequences meet."""
    chosen: list[Example] = []
    for example in sorted(examples, key=lambda e: len(e.input_ids)):
        total = sum(len(e.input_ids) for e in chosen) + len(example.input_ids)
        if len(chosen) >= CHECK_MAX_SEQUENCES or (len(chosen) >= 2 and total > CHECK_MAX_TOKENS):
            break
        chosen.append(example)
    return chosen


@dataclass(frozen=True, slots=True)
class EngineCheck:
    """The first-step comparison of a job: both losses, and whether they agree."""

    fast_loss: float
    reference_loss: float
    tolerance: Tolerance

    @property
    def agrees(self) -> bool:
        return self.tolerance.agree(self.fast_loss, self.reference_loss)

    def describe(self) -> str:
        return f"fast step loss {self.tolerance.describe(self.fast_loss, self.reference_loss)}"


def check_fast_engine(model: nn.Module, examples: Sequence[Example], device: torch.device,
                      fast: FastStep | None = None) -> EngineCheck:  # fmt: skip
    """The fast engine's loss on `examples` against the reference's, same weights, same batch (no update).

    `fast`: the step to check (default: a fresh `FastStep` of `model`, with the kernel this device picks).
    """
    hf_model = unwrap(model)
    fast = fast or FastStep(hf_model, device)
    packed = pack_examples(examples)
    fast_loss = packed_eval_loss(fast, fast.inputs(packed, static=False))
    # The reference side is held-out evaluation's own computation: padded batch, full logits, eval mode, no grad.
    reference_loss = evaluate(model, examples, batch_size=len(examples), device=device).loss
    return EngineCheck(fast_loss, reference_loss, Tolerance.for_dtype(fast.autocast))
