"""The LM loss on the positions that carry one: the head and cross-entropy without full logits.

Two implementations of one contract (`LossSums`: the sum of token cross-entropies, gradients to the
hidden states and to a trained head, and the number of tokens whose argmax prediction is the label):

- `chunked_lm_loss`: the head and cross-entropy in checkpointed row chunks; any head module
  (plain, tied, PEFT's ModulesToSaveWrapper, LoRA-wrapped); no host sync, so it can be captured.
  The argmax-correct count is taken from each chunk's logits while they exist, as a device tensor.
- Liger's fused linear-cross-entropy (``liger-kernel``, the ``gpu`` extra) on CUDA when installed,
  the head is a plain linear weight and the model's vocabulary is at most `LIGER_MAX_VOCAB_PER_HIDDEN`
  times its hidden size (`liger_pays`): Liger splits the rows into about V/H chunks and re-reads the
  whole head twice per chunk, accumulating the head's gradient in the compute dtype -- on a small
  model with a large vocabulary (Qwen2.5-0.5B: V/H ~ 170, ~97 chunks, ~100 GB of head reads a step)
  that costs more than the chunked loss saves. It reads the number of counted tokens back to the
  host, so CUDA-graph captured steps use the chunked loss. It never materialises the logits, so it counts no correct tokens (None): token
  accuracy is not reported on that path rather than paying for a second head pass.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from worker.training.example import IGNORE_INDEX

LOSS_CHUNK_ROWS = 4096  # loss rows per LM-head chunk: 4096 x 151,936 fp32 logits ~ 2.5 GB transient
LIGER_MAX_VOCAB_PER_HIDDEN = 64  # Llama-3-8B: 32; Qwen2.5-7B: 42; Qwen2.5-0.5B: 170 (chunked loss)
SMALL_LOGITS_BYTES = 64 * 2**20  # fp32 logits this small are kept for the backward instead of recomputed


class LossSums(NamedTuple):
    """One loss computation's sums, both 0-dim on the device (reading either is a host sync)."""

    loss_sum: torch.Tensor  # fp32: sum of the counted tokens' cross-entropies (differentiable)
    correct: torch.Tensor | None  # int64: counted tokens whose argmax logit is the label; None: not computed


LossSumFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], LossSums]


def count_correct(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Rows whose argmax is the target (an ignored target, -100, never matches); no gradient, no sync."""
    return (logits.detach().argmax(dim=-1) == targets).sum()


def _cross_entropy_sums(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(hidden).float()
    loss = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    # After the loss: a checkpointed chunk's recompute in the backward stops once the tensors the
    # backward needs are rebuilt, so the argmax is not paid for twice.
    return loss, count_correct(logits, targets)


def chunked_lm_loss(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_rows: int = LOSS_CHUNK_ROWS
) -> LossSums:
    """Cross-entropy sum and argmax-correct count of ``head(hidden)`` against `targets`, `chunk_rows` rows at a time.

    Each chunk runs under activation checkpointing, so its logits are freed after the forward and
    recomputed in the backward: at most one chunk of logits is ever alive. When all the logits fit in
    `SMALL_LOGITS_BYTES` (small vocabularies, few loss rows) they are computed once and kept instead. The head has no
    randomness, so no RNG state is saved (saving it would break CUDA-graph capture).
    """
    if hidden.shape[0] == 0:
        # keeps the graph so backward() works; all grads zero
        return LossSums(hidden.sum() * 0.0, torch.zeros((), dtype=torch.long, device=hidden.device))
    if _logits_fit(head, hidden.shape[0], chunk_rows):
        return LossSums(*_cross_entropy_sums(head, hidden, targets))  # small enough to keep: no recompute
    total: torch.Tensor | None = None
    correct: torch.Tensor | None = None
    for start in range(0, hidden.shape[0], chunk_rows):
        part, right = checkpoint(
            _cross_entropy_sums,
            head,
            hidden[start : start + chunk_rows],
            targets[start : start + chunk_rows],
            use_reentrant=False,
            preserve_rng_state=False,
        )
        total = part if total is None else total + part
        correct = right if correct is None else correct + right
    assert total is not None
    return LossSums(total, correct)


def chunked_lm_loss_sum(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_rows: int = LOSS_CHUNK_ROWS
) -> torch.Tensor:
    """The cross-entropy sum alone (see `chunked_lm_loss`)."""
    return chunked_lm_loss(head, hidden, targets, chunk_rows).loss_sum


def _token_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return -F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")


def chunked_token_logps(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_rows: int = LOSS_CHUNK_ROWS
) -> torch.Tensor:
    """Log-probability of each target under ``head(hidden)`` (0 where the target is IGNORE_INDEX), (rows,) fp32.

    The per-token form of `chunked_lm_loss_sum` (DPO sums these per sequence), with the same memory
    bound: checkpointed chunks of `chunk_rows` rows, or the logits kept when they are small.
    """
    if hidden.shape[0] == 0:
        return hidden.sum(-1).float() * 0.0  # (0,), still in the graph
    if _logits_fit(head, hidden.shape[0], chunk_rows):
        return _token_logps(head, hidden, targets)
    parts = [
        checkpoint(
            _token_logps,
            head,
            hidden[start : start + chunk_rows],
            targets[start : start + chunk_rows],
            use_reentrant=False,
            preserve_rng_state=False,
        )
        for start in range(0, hidden.shape[0], chunk_rows)
    ]
    return torch.cat(parts)


def _logits_fit(head: nn.Module, rows: int, chunk_rows: int) -> bool:
    """Whether all `rows` rows of fp32 logits fit in one chunk and in SMALL_LOGITS_BYTES (then kept, not recomputed)."""
    vocab = head_vocab(head)
    return vocab is not None and rows <= chunk_rows and rows * vocab * 4 <= SMALL_LOGITS_BYTES


def head_vocab(head: nn.Module) -> int | None:
    """How many logits `head` computes per row: its weight's rows. Not `out_features`: PEFT builds a tied
    head's trainable copy as ``nn.Linear(*embedding.weight.shape)`` and then shares the embedding's weight,
    so `out_features` there is the hidden size while the weight is (vocabulary, hidden)."""
    linear = head_linear(head)
    return None if linear is None else int(linear.weight.shape[0])


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


def liger_lm_loss_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> LossSums:
    """Liger's fused linear-cross-entropy (sum over counted tokens) for a plain-linear head.

    The fused kernel never holds the logits, so no argmax-correct count (None): token accuracy is
    not reported on this path (a second, unfused head pass would cost what the fusion saves).
    """
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    linear = head_linear(head)
    if linear is None:
        raise TypeError(f"fused linear-cross-entropy needs a plain linear head, not {type(head).__name__}")
    weight = linear.weight.to(hidden.dtype)  # the kernel takes one dtype; the cast is differentiable
    bias = None if linear.bias is None else linear.bias.to(hidden.dtype)
    loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")
    loss: torch.Tensor = loss_fn(weight, hidden, targets, bias)
    return LossSums(loss.float(), None)


def liger_pays(head: nn.Module) -> bool:
    """Whether Liger's fused loss is worth it for this head: a plain linear one of a vocabulary at most
    `LIGER_MAX_VOCAB_PER_HIDDEN` times the hidden size (see the module docstring)."""
    linear = head_linear(head)
    if linear is None:
        return False
    vocab, hidden = linear.weight.shape
    return vocab <= LIGER_MAX_VOCAB_PER_HIDDEN * hidden


def pick_loss(device: torch.device, head: nn.Module, *, captured: bool, chunk_rows: int) -> tuple[str, LossSumFn]:
    """The loss implementation for this step: Liger on CUDA where it can run and pays, else the chunked one."""
    if device.type == "cuda" and not captured and liger_available() and liger_pays(head):
        return "liger", liger_lm_loss_sum
    return "chunked", lambda h, x, t: chunked_lm_loss(h, x, t, chunk_rows)
