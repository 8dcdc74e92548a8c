"""Held-out figures: the mean cross-entropy over assistant tokens and the token accuracy (the
fraction of them whose argmax prediction is the label, OpenAI's `mean_token_accuracy`), no gradients."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import NamedTuple

import torch
from torch import nn

from worker.training.example import IGNORE_INDEX, Example
from worker.training.forward_backward import autocast_dtype, pad_batch, unwrap
from worker.training.loss import count_correct


class EvalResult(NamedTuple):
    loss: float  # token-weighted mean cross-entropy
    accuracy: float  # fraction of the counted tokens whose argmax prediction is the label


def eval_loss(model: nn.Module, examples: Sequence[Example], *, batch_size: int, device: torch.device) -> float:
    """The held-out loss alone (see `evaluate`)."""
    return evaluate(model, examples, batch_size=batch_size, device=device).loss


@torch.no_grad()
def evaluate(model: nn.Module, examples: Sequence[Example], *, batch_size: int, device: torch.device) -> EvalResult:
    """Token-weighted mean loss and token accuracy over `examples` (padded batches, the plain reference path).

    Micro-batches of at most 4 bound the full-vocabulary logits this path builds (152k-token
    vocabularies make them the largest tensor by far); the forward runs under training's autocast.
    """
    was_training = model.training
    model.eval()
    half = autocast_dtype(unwrap(model))
    total, count = torch.zeros((), device=device, dtype=torch.float64), 0
    correct = torch.zeros((), device=device, dtype=torch.long)
    step = max(1, min(batch_size, 4))
    # Compiled decoder layers are specialised to training's bucketed shapes; evaluation runs them eagerly.
    eager = torch.compiler.set_stance("force_eager") if hasattr(torch.compiler, "set_stance") else nullcontext()
    try:
        with eager:
            for start in range(0, len(examples), step):
                batch = pad_batch(examples[start : start + step], device)
                with torch.autocast(device.type, dtype=half or torch.float32, enabled=half is not None):
                    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
                targets = batch.labels[:, 1:]
                for row in range(logits.shape[0]):  # one fp32 row at a time
                    row_logits = logits[row].float()
                    total += nn.functional.cross_entropy(
                        row_logits, targets[row], ignore_index=IGNORE_INDEX, reduction="sum"
                    ).double()
                    correct += count_correct(row_logits, targets[row])
                count += int((targets != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    return EvalResult(float(total / max(count, 1)), int(correct) / max(count, 1))
