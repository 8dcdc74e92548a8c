"""Direct Preference Optimization: preference pairs tokenized, and the DPO step over them.

Each pair is two sequences sharing a prompt, the chat template applied to the input messages
(rendered with the assistant header the generation prompt adds), one ending in the preferred
completion and one in the non-preferred one. Only the completion and the template's end-of-turn
marker carry labels: SFT's loss mask (`worker.training.data.tokenize_conversation`) with every earlier
assistant turn at weight 0, so both methods agree on where a completion starts and ends.

The policy is the LoRA model; the reference model is the same base with the adapter disabled
(``model.disable_adapter()`` under ``torch.no_grad()``): no second copy in memory, and at the start
of training (the adapter's B at zero) the two agree, so the loss starts at log 2. The loss is the
standard sigmoid loss ``-logsigmoid(beta * ((logp_c - ref_c) - (logp_r - ref_r)))`` over each
sequence's summed completion-token log-probabilities, averaged over the step's pairs.

On the fast engine a step's chosen and rejected sequences are packed into one row (as SFT packs
its sequences, `worker.training.packing`), the LM head applied only at completion positions in row chunks
(`worker.training.loss.chunked_token_logps`), and token log-probs summed per sequence by segment. The
reference engine does the same with a padded batch and full logits.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from shared.preference import PreferenceRecord
from worker.training.attention import EngineKind
from worker.training.data import tokenize_conversation
from worker.training.evaluation import EvalResult
from worker.training.example import IGNORE_INDEX, Example
from worker.training.forward_backward import (
    FastStep,
    StepInputs,
    StepOutput,
    autocast_context,
    autocast_dtype,
    cast_embedding_output,
    pad_batch,
    unwrap,
)
from worker.training.loss import LOSS_CHUNK_ROWS, chunked_token_logps
from worker.training.packing import count_loss_tokens, pack_examples

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from worker.training.chat_template import TurnEnd


@dataclass(frozen=True, slots=True)
class PreferencePair:
    """One preference record tokenized: the same prompt with each completion; labels on the completion only."""

    chosen: Example
    rejected: Example


# --------------------------------------------------------------------------- data


def tokenize_pair(
    tokenizer: PreTrainedTokenizerBase,
    record: PreferenceRecord,
    *,
    max_length: int | None,
    response_template: str | None,
    turn_end: TurnEnd | None = None,
) -> PreferencePair | None:
    """The pair's two sequences; None when truncation to `max_length` leaves either completion no token."""
    # Earlier assistant turns are context: weight 0 keeps them out of the labels.
    prompt = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in record["input"]["messages"]]
    tools = record["input"].get("tools")
    examples = []
    for key in ("preferred_output", "non_preferred_output"):
        example = tokenize_conversation(
            tokenizer, [*prompt, *record[key]], max_length=max_length, response_template=response_template,
            turn_end=turn_end, tools=tools,
        )  # fmt: skip
        if example is None:
            return None
        examples.append(example)
    return PreferencePair(*examples)


def tokenize_preferences(
    tokenizer: PreTrainedTokenizerBase,
    records: Iterable[PreferenceRecord],
    *,
    max_length: int | None,
    response_template: str | None,
) -> tuple[list[PreferencePair], int]:
    """Tokenize every pair; return the pairs and how many were skipped (a completion truncated away)."""
    from worker.training.chat_template import find_turn_end

    pairs: list[PreferencePair] = []
    skipped = 0
    turn_end: TurnEnd | None = None
    for record in records:
        if turn_end is None:  # probed once, when the first record arrives
            turn_end = find_turn_end(tokenizer)
        pair = tokenize_pair(
            tokenizer, record, max_length=max_length, response_template=response_template, turn_end=turn_end
        )
        if pair is None:
            skipped += 1
        else:
            pairs.append(pair)
    return pairs, skipped


# --------------------------------------------------------------------------- the step


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean sigmoid DPO loss and each pair's reward margin (detached).

    `policy` and `reference` are summed completion log-probs, (2n,): the n chosen, then the n rejected.
    """
    n = policy.shape[0] // 2
    ratios = policy - reference
    margins = beta * (ratios[:n] - ratios[n:])
    return -F.logsigmoid(margins).mean(), margins.detach()


class DpoStep:
    """Forward + backward of one optimizer step's preference pairs (the `StepFn` contract, for pairs).

    Run by `worker.training.optimizer_step.EagerTrainStep` only: the static step's shape buckets, compiled layers
    and captured graphs are built around one packed forward per step, and DPO makes two (the policy
    and, adapter disabled, the reference).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        kind: EngineKind,
        device: torch.device,
        beta: float,
        loss_chunk_rows: int = LOSS_CHUNK_ROWS,
    ) -> None:
        if not callable(getattr(model, "disable_adapter", None)):
            raise TypeError("DPO needs a PEFT model: its reference is the base with the adapter disabled")
        self.model, self.device, self.beta, self.chunk_rows = model, device, beta, loss_chunk_rows
        hf_model = unwrap(model)
        self.fast = FastStep(hf_model, device, loss_chunk_rows=loss_chunk_rows) if kind == "fast" else None
        self.autocast = autocast_dtype(hf_model)
        cast_embedding_output(hf_model, self.autocast)

    def __call__(self, pairs: Sequence[PreferencePair]) -> StepOutput:
        loss, margins, examples = self.loss(pairs)
        loss.backward()
        # The reward margin is beta times the log-ratio margin; accuracy, the pairs whose chosen side leads.
        metrics = {"reward_margin": margins.mean(), "reward_accuracy": (margins > 0).float().mean()}
        tokens, loss_tokens = sum(len(e.input_ids) for e in examples), sum(count_loss_tokens(e) for e in examples)
        return StepOutput(loss.detach(), tokens, loss_tokens, metrics=metrics)

    def loss(self, pairs: Sequence[PreferencePair]) -> tuple[torch.Tensor, torch.Tensor, list[Example]]:
        """The pairs' mean DPO loss (in the graph unless under no_grad), their reward margins, and the sequences."""
        examples = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        policy, reference = self.logps(examples)
        loss, margins = dpo_loss(policy, reference, self.beta)
        return loss, margins, examples

    def logps(self, examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed completion log-probs of each sequence under the policy and under the reference, (n,) each."""
        if self.fast is None:
            with torch.no_grad(), self.model.disable_adapter():  # type: ignore[operator]
                reference = padded_sequence_logps(self.model, examples, self.device, self.autocast)
            return padded_sequence_logps(self.model, examples, self.device, self.autocast), reference
        inputs = self.fast.inputs(pack_examples(examples), static=False)
        with torch.no_grad(), self.model.disable_adapter():  # type: ignore[operator]
            reference = packed_sequence_logps(self.fast, inputs, len(examples), self.chunk_rows)
        return packed_sequence_logps(self.fast, inputs, len(examples), self.chunk_rows), reference


def packed_sequence_logps(fast: FastStep, inputs: StepInputs, num_sequences: int, chunk_rows: int) -> torch.Tensor:
    """Each packed sequence's summed log-prob of its labelled tokens, (num_sequences,) fp32, from one forward."""
    with fast.forward_context():
        hidden = fast.hidden_states(inputs)
        token_logps = chunked_token_logps(
            fast.head, hidden.index_select(0, inputs.loss_rows), inputs.targets, chunk_rows
        )
    sequence = inputs.segment_ids.index_select(0, inputs.loss_rows)  # which sequence each loss row belongs to
    # Filler rows (none in eager packing) have IGNORE_INDEX targets, whose log-prob is 0 here.
    total = torch.zeros(num_sequences + 1, device=token_logps.device, dtype=token_logps.dtype)
    return total.index_add(0, sequence, token_logps)[:num_sequences]


def padded_sequence_logps(
    model: nn.Module, examples: Sequence[Example], device: torch.device, autocast: torch.dtype | None
) -> torch.Tensor:
    """The reference engine's form of `packed_sequence_logps`: a right-padded batch with full logits."""
    batch = pad_batch(examples, device)
    with autocast_context(device, autocast):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    targets = batch.labels[:, 1:]
    token_logps = -F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return token_logps.sum(dim=1)


@torch.no_grad()
def dpo_evaluate(step: DpoStep, pairs: Sequence[PreferencePair], *, batch_size: int) -> EvalResult:
    """Held-out pairs' mean DPO loss and reward accuracy (the fraction whose chosen side leads), no gradients,
    the model in eval mode: DPO's counterpart of `worker.training.evaluation.evaluate`."""
    model = step.model
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=step.device, dtype=torch.float64)
    right = torch.zeros((), device=step.device, dtype=torch.float64)
    try:
        for start in range(0, len(pairs), batch_size):
            batch = pairs[start : start + batch_size]
            loss, margins, _ = step.loss(batch)
            loss_sum += loss.double() * len(batch)
            right += (margins > 0).double().sum()
    finally:
        model.train(was_training)
    n = max(len(pairs), 1)
    return EvalResult(float(loss_sum / n), float(right / n))
