"""Held-out loss: the mean cross-entropy over assistant tokens, no gradients."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from worker.example import IGNORE_INDEX, Example


@torch.no_grad()
def eval_loss(model: nn.Module, examples: Sequence[Example], *, batch_size: int, device: torch.device) -> float:
    """Token-weighted mean loss over `examples` (padded batches, the plain reference path)."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device, dtype=torch.float64), 0
    try:
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
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
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            targets = labels[:, 1:]
            total += nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
            ).double()
            count += int((targets != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    return float(total / max(count, 1))
