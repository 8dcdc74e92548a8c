"""Held-out loss: the mean cross-entropy over assistant tokens, no gradients."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import nn

from worker.example import IGNORE_INDEX, Example
from worker.step import autocast_dtype, unwrap


@torch.no_grad()
def eval_loss(model: nn.Module, examples: Sequence[Example], *, batch_size: int, device: torch.device) -> float:
    """Token-weighted mean loss over `examples` (padded batches, the plain reference path).

    Micro-batches of at most 4 bound the full-vocabulary logits this path builds (152k-token
    vocabularies make them the largest tensor by far); the forward runs under training's autocast.
    """
    was_training = model.training
    model.eval()
    half = autocast_dtype(unwrap(model))
    total, count = torch.zeros((), device=device, dtype=torch.float64), 0
    step = max(1, min(batch_size, 4))
    # Compiled decoder layers are specialised to training's bucketed shapes; evaluation runs them eagerly.
    eager = torch.compiler.set_stance("force_eager") if hasattr(torch.compiler, "set_stance") else nullcontext()
    try:
        with eager:
            for start in range(0, len(examples), step):
                batch = examples[start : start + step]
                width = max(len(e.input_ids) for e in batch)
                ids = torch.zeros((len(batch), width), dtype=torch.long)
                labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, e in enumerate(batch):
                    n = len(e.input_ids)
                    ids[row, :n] = torch.tensor(e.input_ids)
                    labels[row, :n] = torch.tensor(e.labels)
                    mask[row, :n] = 1
                ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
                with torch.autocast(device.type, dtype=half or torch.float32, enabled=half is not None):
                    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
                targets = labels[:, 1:]
                for row in range(logits.shape[0]):  # one fp32 row at a time
                    total += nn.functional.cross_entropy(
                        logits[row].float(), targets[row], ignore_index=IGNORE_INDEX, reduction="sum"
                    ).double()
                count += int((targets != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    return float(total / max(count, 1))
