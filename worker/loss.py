"""The LM loss on the positions that carry one: the head and cross-entropy without full logits.

Two implementations of one contract (sum of token cross-entropies, gradients to the hidden states
and to a trained head):

- `chunked_lm_loss_sum`: the head and cross-entropy in checkpointed row chunks; any head module
  (plain, tied, PEFT's ModulesToSaveWrapper, LoRA-wrapped); no host sync, so it can be captured.
- Liger's fused linear-cross-entropy (``liger-kernel``, the ``gpu`` extra) on CUDA when installed
  and the head is a plain linear weight: one fused kernel family instead of chunked matmuls.
  It reads the number of counted tokens back to the host, so CUDA-graph captured steps use the
  chunked loss.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from worker.example import IGNORE_INDEX

LOSS_CHUNK_ROWS = 4096  # loss rows per LM-head chunk: 4096 x 151,936 fp32 logits ~ 2.5 GB transient
SMALL_LOGITS_BYTES = 64 * 2**20  # fp32 logits this small are kept for the backward instead of recomputed

LossSumFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def _cross_entropy_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_lm_loss_sum(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_rows: int = LOSS_CHUNK_ROWS
) -> torch.Tensor:
    """Sum of cross-entropy of ``head(hidden)`` against `targets`, `chunk_rows` rows at a time.

    Each chunk runs under activation checkpointing, so its logits are freed after the forward and
    recomputed in the backward: at most one chunk of logits is ever alive. When all the logits fit in
    `SMALL_LOGITS_BYTES` (small vocabularies, few loss rows) they are computed once and kept instead. The head has no
    randomness, so no RNG state is saved (saving it would break CUDA-graph capture).
    """
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0  # keeps the graph so backward() works; all grads zero
    vocab = getattr(head_linear(head), "out_features", None)
    if vocab is not None and hidden.shape[0] <= chunk_rows and hidden.shape[0] * vocab * 4 <= SMALL_LOGITS_BYTES:
        return _cross_entropy_sum(head, hidden, targets)  # small enough to keep: no recompute in backward
    total: torch.Tensor | None = None
    for start in range(0, hidden.shape[0], chunk_rows):
        part = checkpoint(
            _cross_entropy_sum,
            head,
            hidden[start : start + chunk_rows],
            targets[start : start + chunk_rows],
            use_reentrant=False,
            preserve_rng_state=False,
        )
        total = part if total is None else total + part
    assert total is not None
    return total


def head_linear(head: nn.Module) -> nn.Linear | None:
    """The plain linear layer that computes `head`'s logits, or None (LoRA on the head, several adapters)."""
    if type(head) is nn.Linear:
        return head
    modules_to_save = getattr(head, "modules_to_save", None)
    active = getattr(head, "active_adapters", None)
    if isinstance(modules_to_save, nn.ModuleDict) and isinstance(active, list | tuple) and len(active) == 1:
        if getattr(head, "disable_adapters", False):
            original = getattr(head, "original_module", None)
            return original if type(original) is nn.Linear else None
        module = dict(modules_to_save.items()).get(active[0])
        return module if type(module) is nn.Linear else None
    return None


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def liger_lm_loss_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Liger's fused linear-cross-entropy (sum over counted tokens) for a plain-linear head."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    linear = head_linear(head)
    if linear is None:
        raise TypeError(f"fused linear-cross-entropy needs a plain linear head, not {type(head).__name__}")
    weight = linear.weight.to(hidden.dtype)  # the kernel takes one dtype; the cast is differentiable
    bias = None if linear.bias is None else linear.bias.to(hidden.dtype)
    loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")
    loss: torch.Tensor = loss_fn(weight, hidden, targets, bias)
    return loss.float()


def pick_loss(device: torch.device, head: nn.Module, *, captured: bool, chunk_rows: int) -> tuple[str, LossSumFn]:
    """The loss implementation for this step: Liger on CUDA when it can run, else the chunked one."""
    if device.type == "cuda" and not captured and liger_available() and head_linear(head) is not None:
        return "liger", liger_lm_loss_sum
    return "chunked", lambda h, x, t: chunked_lm_loss_sum(h, x, t, chunk_rows)
