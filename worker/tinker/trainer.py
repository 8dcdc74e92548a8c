"""One Tinker training client's model on a worker: its adapter and AdamW state, resident between calls.

`forward` / `forward_backward` run a call's data on the packed engine (`worker.training.forward_backward`'s
`FastStep`: one packed row, attention per sequence) and compute each target token's log-probability from
the decoder's last hidden states. Under autograd only the rows the loss can send a gradient through reach
the LM head (`worker.tinker.losses.bearing_rows`); the other rows' log-probabilities, which the client
still gets back, are computed without a graph. Gradients accumulate across calls until `optim_step`,
which sets the client's AdamW parameters for that step, clips, steps and zeroes them.

A datum's `target_tokens[i]` is what position `i` predicts. The packed engine's `Example` predicts
``labels[i + 1]`` from position ``i``, so a datum becomes ``input_ids = tokens + [target_tokens[-1]]``,
``labels = [ignored] + target_tokens``: the appended token is never attended to by an earlier position.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from shared.config import EngineName
from shared.tinker_ops import LOSS_INPUTS, ForwardOp, ForwardResult, OptimStepOp, OptimStepResult, TinkerDatum
from worker.tinker.lora import adapter_parameters
from worker.tinker.losses import LossInputs, bearing_rows, elementwise_loss
from worker.training.example import IGNORE_INDEX, Example
from worker.training.forward_backward import FastStep, autocast_context, autocast_dtype, pad_batch, unwrap
from worker.training.loss import chunked_token_logps
from worker.training.packing import pack_examples
from worker.training.staged_dir import staged_dir

OPTIMIZER_FILE = "optimizer.pt"  # AdamW's state, in a training checkpoint (save_state) beside the adapter
STATE_FILE = "tinker_state.json"  # what the checkpoint is: its model, base, rank, optimizer steps taken
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into this model (missing, another base or rank, no optimizer state)."""


class TinkerTrainer:
    """A PEFT model in training and its optimizer; every call runs on the device the model is on."""

    def __init__(
        self, model: PeftModel, *, engine: EngineName, base: str, rank: int, adapter: str = "default",
        fast: FastStep | None = None,
    ) -> None:  # fmt: skip
        """`adapter` names this client's adapter on `model` (others may be there too); `fast`: the packed engine of
        the clients sharing the base, when one exists already."""
        self.model = model
        self.adapter = adapter
        self.base = base
        self.rank = rank
        hf_model = unwrap(model)
        self.device = next(model.parameters()).device
        self.head = hf_model.get_output_embeddings()
        self.vocab_size = int(hf_model.get_input_embeddings().weight.shape[0])
        self.fast = fast or (FastStep(hf_model, self.device) if engine == "fast" else None)
        self.autocast = autocast_dtype(hf_model)
        self.params = adapter_parameters(model, adapter)
        self.optimizer = self._new_optimizer()
        self.steps = 0  # optimizer steps taken (restored with a training checkpoint)
        model.train()

    def activate(self) -> None:
        """Make this client's adapter the one the model runs (and the only one that trains)."""
        if self.model.active_adapter != self.adapter:
            self.model.set_adapter(self.adapter)
        for param in self.params:
            param.requires_grad_(True)

    def _new_optimizer(self) -> torch.optim.AdamW:
        fused = self.device.type == "cuda"
        return torch.optim.AdamW(self.params, lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0,
                                 fused=True if fused else None)  # fmt: skip

    # ------------------------------------------------------------------ forward / backward

    def forward(self, op: ForwardOp) -> ForwardResult:
        self._check(op.data)
        self.activate()
        backward = op.op == "forward_backward"
        lengths = [len(d.tokens) for d in op.data]
        inputs = self._loss_inputs(op)
        targets = self._flat([d.target_tokens for d in op.data], torch.long)
        with torch.set_grad_enabled(backward):
            mask = bearing_rows(op.loss_fn, inputs) if backward else None
            logprobs = self._target_logprobs(op.data, targets, mask)
            terms = elementwise_loss(op.loss_fn, logprobs, inputs, op.loss_fn_config)
            loss = terms.sum()
            if backward and loss.requires_grad:
                loss.backward()
        return self._result(logprobs, terms, loss, lengths)

    @staticmethod
    def _result(logprobs: torch.Tensor, terms: torch.Tensor, loss: torch.Tensor, lengths: list[int]) -> ForwardResult:
        host_logprobs = logprobs.detach().float().cpu().split(lengths)
        host_terms = terms.detach().float().cpu().split(lengths)
        outputs = [
            {"logprobs": lp.tolist(), "elementwise_loss": t.tolist()}
            for lp, t in zip(host_logprobs, host_terms, strict=True)
        ]
        return ForwardResult(loss_fn_outputs=outputs, metrics={"loss:sum": float(loss.detach())})

    def _check(self, data: Sequence[TinkerDatum]) -> None:
        """Token ids the model has, and aligned inputs: on a GPU an id past the embedding is a device-side assert
        that takes the whole process down, so it is refused here even though the API checks it too."""
        for i, datum in enumerate(data):
            if not datum.tokens or len(datum.target_tokens) != len(datum.tokens):
                raise ValueError(f"data[{i}]: target_tokens has {len(datum.target_tokens)} entries for "
                                 f"{len(datum.tokens)} input tokens")  # fmt: skip
            for name in ("tokens", "target_tokens"):
                bad = next((t for t in getattr(datum, name) if not 0 <= t < self.vocab_size), None)
                if bad is not None:
                    raise ValueError(
                        f"data[{i}].{name}: token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})"
                    )
            for name in ("weights", "logprobs", "advantages"):
                values = getattr(datum, name)
                if values is not None and len(values) != len(datum.tokens):
                    raise ValueError(f"data[{i}].loss_fn_inputs[{name!r}] has {len(values)} entries for "
                                     f"{len(datum.tokens)} input tokens")  # fmt: skip

    def _flat(self, rows: Sequence[Sequence[float]], dtype: torch.dtype) -> torch.Tensor:
        flat = [x for row in rows for x in row]
        return torch.tensor(flat, dtype=dtype).to(self.device)

    def _loss_inputs(self, op: ForwardOp) -> LossInputs:
        """The loss's inputs; cross-entropy without weights weighs every token 1 (the SDK's default)."""

        def column(name: str) -> torch.Tensor | None:
            values = [getattr(d, name) for d in op.data]
            if name == "weights" and op.loss_fn == "cross_entropy":
                values = [v if v is not None else [1.0] * len(d.tokens) for v, d in zip(values, op.data, strict=True)]
            missing = next((i for i, v in enumerate(values) if v is None), None)
            if missing is None:
                return self._flat(values, torch.float32)
            if name in LOSS_INPUTS[op.loss_fn]:
                raise ValueError(f"data[{missing}].loss_fn_inputs: {op.loss_fn} needs {name!r}")
            return None

        return LossInputs(weights=column("weights"), logprobs=column("logprobs"), advantages=column("advantages"))

    def _target_logprobs(
        self, data: Sequence[TinkerDatum], targets: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Each position's log-probability of its target, (total tokens,) fp32, in the data's order."""
        examples = [Example(d.tokens + d.target_tokens[-1:], [IGNORE_INDEX, *d.target_tokens]) for d in data]
        if self.fast is None:
            return self._reference_logprobs(examples, targets, mask)
        packed = pack_examples(examples)
        step_inputs = self.fast.inputs(packed, static=False)
        with self.fast.forward_context():
            hidden = self.fast.hidden_states(step_inputs)
            rows = hidden.index_select(0, step_inputs.loss_rows)
            return self._head_logprobs(rows, step_inputs.targets, mask)

    def _head_logprobs(
        self, rows: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None, head: nn.Module | None = None
    ) -> torch.Tensor:
        head = head or self.head
        if mask is None or not torch.is_grad_enabled():
            with torch.no_grad():
                return chunked_token_logps(head, rows, targets)
        bearing = mask.nonzero().squeeze(1)
        rest = (~mask).nonzero().squeeze(1)
        with_grad = chunked_token_logps(head, rows.index_select(0, bearing), targets.index_select(0, bearing))
        with torch.no_grad():
            without = chunked_token_logps(head, rows.index_select(0, rest).detach(), targets.index_select(0, rest))
        out = torch.zeros(rows.shape[0], dtype=torch.float32, device=rows.device)
        return out.index_copy(0, rest, without).index_copy(0, bearing, with_grad)

    def _reference_logprobs(
        self, examples: list[Example], targets: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The plain way, for a base the packed engine cannot run: padded batch, full logits."""
        batch = pad_batch(examples, self.device)
        with autocast_context(self.device, self.autocast):
            logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        logits = logits.float()[:, :-1]
        labels = batch.labels[:, 1:]
        keep = labels != IGNORE_INDEX
        logprobs = -F.cross_entropy(logits[keep], labels[keep], reduction="none")
        return logprobs

    # ------------------------------------------------------------------ optimizer

    def optim_step(self, op: OptimStepOp) -> OptimStepResult:
        for group in self.optimizer.param_groups:
            group["lr"] = op.learning_rate
            group["betas"] = (op.beta1, op.beta2)
            group["eps"] = op.eps
            group["weight_decay"] = op.weight_decay
        max_norm = op.grad_clip_norm if op.grad_clip_norm > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return OptimStepResult(metrics={"grad_norm:mean": float(grad_norm), "learning_rate:mean": op.learning_rate})

    # ------------------------------------------------------------------ checkpoints

    def save(self, folder: Path, *, optimizer: bool, model_id: str, tinker_path: str) -> None:
        """An adapter folder (loadable by PEFT, chat completions and merge), with the optimizer's state when
        `optimizer`; written beside `folder` and swapped in whole."""
        with staged_dir(folder, "adapter", job=model_id) as staging:
            self._save_adapter(staging)
            meta: dict[str, Any] = {"model_id": model_id, "base_model": self.base, "rank": self.rank,
                                    "steps": self.steps, "tinker_path": tinker_path, "optimizer": optimizer}  # fmt: skip
            if optimizer:
                torch.save(self.optimizer.state_dict(), staging / OPTIMIZER_FILE)
            (staging / STATE_FILE).write_text(json.dumps(meta, indent=2))

    def _save_adapter(self, folder: Path) -> None:
        """This client's adapter alone, as a top-level PEFT adapter folder naming the base (whatever its name here)."""
        config = copy.copy(self.model.peft_config[self.adapter])
        config.base_model_name_or_path = self.base
        config.inference_mode = True
        config.save_pretrained(str(folder))
        state = get_peft_model_state_dict(self.model, adapter_name=self.adapter, save_embedding_layers=False)
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(folder / ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})  # fmt: skip

    def remove(self) -> None:
        """Take this client's adapter (and its optimizer state) off the shared model."""
        self.optimizer.zero_grad(set_to_none=True)
        self.params = []
        self.optimizer = torch.optim.AdamW([torch.zeros(1)])
        if self.adapter in self.model.peft_config:
            with warnings.catch_warnings():  # PEFT says so when the adapter was the active one: expected here
                warnings.filterwarnings("ignore", message=r"Adapter .* was active which is now deleted")
                self.model.delete_adapter(self.adapter)

    def load(self, folder: Path, *, optimizer: bool) -> None:
        """The adapter weights (and the optimizer's state when `optimizer`, else a fresh optimizer) from `folder`."""
        meta = read_state_meta(folder)
        if meta.get("rank") not in (None, self.rank):
            raise CheckpointError(f"the checkpoint has LoRA rank {meta['rank']}, this model {self.rank}")
        if meta.get("base_model") not in (None, self.base):
            raise CheckpointError(f"the checkpoint was trained on {meta['base_model']}, this model is {self.base}")
        weights = folder / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise CheckpointError(f"no adapter weights in the checkpoint ({ADAPTER_WEIGHTS} is missing)")
        state = {k: v.to(self.device) for k, v in load_file(str(weights)).items()}
        expected = set(get_peft_model_state_dict(self.model, adapter_name=self.adapter, save_embedding_layers=False))
        if set(state) != expected:
            raise CheckpointError("the checkpoint's adapter does not fit this model (its LoRA modules differ)")
        set_peft_model_state_dict(self.model, state, adapter_name=self.adapter)
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer = self._new_optimizer()
        self.steps = int(meta.get("steps", 0)) if optimizer else 0
        if optimizer:
            saved = folder / OPTIMIZER_FILE
            if not saved.is_file():
                raise CheckpointError(
                    "the checkpoint has no optimizer state (it was saved for sampling, not with save_state)"
                )
            self.optimizer.load_state_dict(torch.load(saved, map_location=self.device, weights_only=True))


def read_state_meta(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise CheckpointError(f"no checkpoint at {folder}")
    try:
        meta = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}
