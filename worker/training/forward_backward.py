"""Forward + backward of one optimizer step's sequences on a PEFT causal LM.

Two engines share one contract (`StepFn`: sequences in, `StepOutput` out, gradients accumulated on
the trainable parameters, no optimizer step):

- ``"reference"``: the plain way. Right-padded batch with an attention mask, the model's full
  logits, shifted cross-entropy averaged over the loss tokens.
- ``"fast"``: the sequences packed into one row (`worker.training.packing`), attention kept per sequence
  (`worker.training.attention`), the decoder's last hidden states gathered at the positions that carry loss
  and pushed through the LM head and cross-entropy without full logits (`worker.training.loss`). No host
  sync in the step.

Both also return the step's token accuracy (the fraction of loss tokens whose argmax prediction is
the label) as a device tensor, read back only where the loss is (logging steps).

Dtype contract: trained parameters are fp32 over a frozen bf16/fp16 base, and the forward runs
under autocast to the base's dtype. The input embedding may itself be trained (fp32, the seed's
``modules_to_save``), so its output is cast to the compute dtype: otherwise the residual stream and
RoPE run in fp32, q/k arrive fp32 next to a bf16 v, and the varlen kernels (which do not autocast)
refuse them. Reference and fast steps make the same cast, so they compute the same function.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from worker.training.attention import (
    PACKED_ATTENTION,
    EngineKind,
    PackedMetadata,
    VarlenKernel,
    packed_step,
    packing_unsupported,
    select_varlen_kernel,
)
from worker.training.example import IGNORE_INDEX, Example
from worker.training.loss import LOSS_CHUNK_ROWS, count_correct, pick_loss
from worker.training.packing import PAD_ID, PackedBatch, count_loss_tokens, pack_examples


@dataclass(frozen=True, slots=True)
class StepOutput:
    """What one step returns. `loss` stays on the device (reading it is a host sync)."""

    loss: torch.Tensor  # 0-dim: mean cross-entropy over the step's loss tokens
    num_tokens: int  # real (non-padding) tokens in the step
    num_loss_tokens: int  # tokens predicted with a label, i.e. terms of the mean
    accuracy: torch.Tensor | None = None  # 0-dim fp32: loss tokens predicted right (argmax); None: not computed
    metrics: dict[str, torch.Tensor] | None = None  # further 0-dim figures on the device (DPO: reward margin, accuracy)


StepFn = Callable[[Sequence[Example]], StepOutput]
AUTO = "auto"


def make_step_fn(
    model: nn.Module,
    *,
    kind: EngineKind,
    device: torch.device,
    pad_to_multiple: int | None = None,
    loss_chunk_rows: int = LOSS_CHUNK_ROWS,
    kernel: VarlenKernel | str | None = AUTO,
) -> StepFn:
    """A function running forward + backward for one optimizer step's sequences.

    `model`: a PEFT-wrapped (or plain) Hugging Face causal LM already on `device`, in train mode;
    for ``"fast"`` loaded with `PACKED_ATTENTION` (see `worker.training.attention.engine_attn_implementation`).
    `pad_to_multiple` pads the packed row and loss rows; `kernel` overrides the varlen kernel
    (``"auto"``: the one that runs on this device and dtype).
    """
    hf_model = unwrap(model)
    if kind == "reference":
        autocast = autocast_dtype(hf_model)
        cast_embedding_output(hf_model, autocast)  # the fast step installs its own in FastStep
        return functools.partial(_reference_step, model, device, autocast)
    if kind != "fast":
        raise ValueError(f"unknown engine {kind!r}")
    return FastStep(hf_model, device, kernel=kernel, pad_to_multiple=pad_to_multiple, loss_chunk_rows=loss_chunk_rows)


def unwrap(model: nn.Module) -> Any:
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def decoder_layers(hf_model: Any) -> list[nn.Module]:
    """The decoder's layers (what the static step compiles; how deep the model is), or none where it has no list."""
    layers = getattr(hf_model.get_decoder(), "layers", None)
    return list(layers) if layers is not None else []


def autocast_dtype(hf_model: nn.Module) -> torch.dtype | None:
    """The frozen base weights' half dtype (the matmuls' compute dtype), else None (fp32: no autocast).

    fp16 runs without a grad scaler: fp32 master weights keep Adam's states from underflowing; small
    activation gradients may still flush to zero (prefer bf16 where the GPU has it, as `auto` does).
    """
    frozen = next((p.dtype for p in hf_model.parameters() if not p.requires_grad and p.is_floating_point()), None)
    return frozen if frozen in (torch.bfloat16, torch.float16) else None


def cast_embedding_output(hf_model: nn.Module, dtype: torch.dtype | None) -> None:
    """Make the input embedding's output `dtype` (idempotent; no-op for None)."""
    embedding = hf_model.get_input_embeddings()  # type: ignore[operator]
    handle = getattr(embedding, "_lora_server_cast", None)
    if handle is not None:
        handle.remove()
    if dtype is None:
        return

    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return output.to(dtype) if output.is_floating_point() else output

    embedding._lora_server_cast = embedding.register_forward_hook(hook)


def autocast_context(device: torch.device, dtype: torch.dtype | None, *, cache: bool = True) -> torch.autocast:
    """Autocast to `dtype` (off when None). CUDA-graph capture needs the weight-cast cache off."""
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None, cache_enabled=cache)


def to_device(values: Sequence[float], device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """One host->device copy (pinned + non_blocking on CUDA: no sync)."""
    tensor = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@dataclass(frozen=True, slots=True)
class PaddedBatch:
    """Examples right-padded to the longest, on the device: what the reference engine (and evaluation) run."""

    input_ids: torch.Tensor  # (B, W)
    attention_mask: torch.Tensor  # (B, W): 1 on real tokens
    labels: torch.Tensor  # (B, W): IGNORE_INDEX on filler and on untrained tokens


def pad_batch(examples: Sequence[Example], device: torch.device) -> PaddedBatch:
    width = max(len(e.input_ids) for e in examples)
    ids, mask, labels = [], [], []
    for e in examples:
        filler = width - len(e.input_ids)
        ids.extend(e.input_ids + [PAD_ID] * filler)
        mask.extend([1] * len(e.input_ids) + [0] * filler)
        labels.extend(e.labels + [IGNORE_INDEX] * filler)
    shape = (len(examples), width)
    return PaddedBatch(
        to_device(ids, device).view(shape), to_device(mask, device).view(shape), to_device(labels, device).view(shape)
    )


def _reference_step(
    model: nn.Module, device: torch.device, autocast: torch.dtype | None, examples: Sequence[Example]
) -> StepOutput:
    batch = pad_batch(examples, device)
    num_loss_tokens = sum(count_loss_tokens(e) for e in examples)
    label_tensor = batch.labels
    with autocast_context(device, autocast):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    logits = logits.float()[:, :-1].reshape(-1, logits.shape[-1])
    targets = label_tensor[:, 1:].reshape(-1)
    loss_sum = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    loss = loss_sum / max(num_loss_tokens, 1)
    accuracy = count_correct(logits, targets).float() / max(num_loss_tokens, 1)
    loss.backward()
    return StepOutput(loss.detach(), sum(len(e.input_ids) for e in examples), num_loss_tokens, accuracy)


@dataclass(slots=True)
class StepInputs:
    """A packed step on the device. Static steps keep one of these per shape and copy into it."""

    input_ids: torch.Tensor  # (1, T)
    position_ids: torch.Tensor  # (1, T)
    segment_ids: torch.Tensor  # (T,)
    cu_seqlens: torch.Tensor  # int32
    loss_rows: torch.Tensor  # (L,)
    targets: torch.Tensor  # (L,)
    loss_scale: torch.Tensor  # 0-dim fp32: 1 / number of loss tokens
    max_len: int
    seq_lens: tuple[int, ...] | None  # host lengths (eager steps only)

    def copy_from(self, other: StepInputs) -> None:
        for name in ("input_ids", "position_ids", "segment_ids", "cu_seqlens", "loss_rows", "targets", "loss_scale"):
            getattr(self, name).copy_(getattr(other, name), non_blocking=True)


class FastStep:
    """Packed, padding-free forward + backward with the loss computed only where it counts."""

    def __init__(
        self,
        hf_model: Any,
        device: torch.device,
        *,
        kernel: VarlenKernel | str | None = AUTO,
        pad_to_multiple: int | None = None,
        loss_chunk_rows: int = LOSS_CHUNK_ROWS,
        captured: bool = False,
    ) -> None:
        implementation = hf_model.config._attn_implementation
        if implementation != PACKED_ATTENTION:
            raise ValueError(
                f"the fast engine needs the model loaded with attn_implementation={PACKED_ATTENTION!r} "
                f"(worker.training.attention.engine_attn_implementation), not {implementation!r}"
            )
        reason = packing_unsupported(hf_model.config)
        if reason is not None:
            raise ValueError(f"the fast engine cannot pack this model: {reason}; use the reference engine")
        self.decoder = hf_model.get_decoder()
        self.head = hf_model.get_output_embeddings()
        self.device = device
        self.autocast = autocast_dtype(hf_model)
        cast_embedding_output(hf_model, self.autocast)
        self.pad_to_multiple = pad_to_multiple
        # A 4D mask is passed through untouched by transformers' mask creation, which otherwise builds
        # a (T, T) mask and probes position_ids for packing with a host sync. Packed attention ignores it.
        self.no_mask = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device)
        compute_dtype = self.autocast or hf_model.dtype
        self.kernel: VarlenKernel | None = (
            select_varlen_kernel(device, compute_dtype) if isinstance(kernel, str) else kernel
        )
        self.captured = captured
        self.loss_name, self.loss_sum = pick_loss(device, self.head, captured=captured, chunk_rows=loss_chunk_rows)
        # Under autocast PEFT's cast of each LoRA input to the fp32 adapter dtype is a wasted round
        # trip (autocast casts it straight back to bf16 for the matmul): two kernels per adapter.
        self.uncast_layers = _peft_tuner_layers(hf_model) if self.autocast is not None else []

    def __call__(self, examples: Sequence[Example]) -> StepOutput:
        packed = pack_examples(examples, pad_to_multiple=self.pad_to_multiple)
        loss, accuracy = self.forward_backward(self.inputs(packed, static=False))
        return StepOutput(loss, packed.num_tokens, packed.num_loss_tokens, accuracy)

    def inputs(self, packed: PackedBatch, *, static: bool) -> StepInputs:
        """`packed` on the device in one host->device copy (no seq_lens when `static`)."""
        total, n_rows, n_cu = len(packed.input_ids), len(packed.loss_rows), len(packed.cu_seqlens)
        flat = to_device(
            packed.input_ids + packed.position_ids + packed.segment_ids + packed.loss_rows + packed.targets
            + packed.cu_seqlens,
            self.device,
        )  # fmt: skip
        ids, positions, segments, rows, targets, cu = flat.split([total, total, total, n_rows, n_rows, n_cu])
        scale = to_device([1.0 / max(packed.num_loss_tokens, 1)], self.device, torch.float32).view(())
        return StepInputs(
            input_ids=ids.view(1, total),
            position_ids=positions.view(1, total),
            segment_ids=segments,
            cu_seqlens=cu.to(torch.int32),
            loss_rows=rows,
            targets=targets,
            loss_scale=scale,
            max_len=total if static else packed.max_len,
            seq_lens=None if static else packed.seq_lens,
        )

    def forward_backward(self, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The step's mean loss and token accuracy (on the device; accuracy None on the fused Liger
        path), gradients accumulated into the trained parameters."""
        with self.forward_context():
            hidden = self.hidden_states(inputs)
            sums = self.loss_sum(self.head, hidden.index_select(0, inputs.loss_rows), inputs.targets)
        loss = sums.loss_sum * inputs.loss_scale
        loss.backward()
        accuracy = None if sums.correct is None else sums.correct.float() * inputs.loss_scale
        return loss.detach(), accuracy

    @contextlib.contextmanager
    def forward_context(self) -> Iterator[None]:
        """What a packed forward (decoder and head) runs under: autocast, no LoRA input casts, the packing guard."""
        with autocast_context(self.device, self.autocast, cache=not self.captured), self._uncast(), packed_step():
            yield

    def hidden_states(self, inputs: StepInputs) -> torch.Tensor:
        """The decoder's last hidden states of the packed row, (T, hidden); call inside `forward_context`."""
        meta = PackedMetadata(self.kernel, inputs.seq_lens, inputs.segment_ids)
        hidden: torch.Tensor = self.decoder(
            input_ids=inputs.input_ids,
            position_ids=inputs.position_ids,
            attention_mask=self.no_mask,
            use_cache=False,
            cu_seq_lens_q=inputs.cu_seqlens,
            cu_seq_lens_k=inputs.cu_seqlens,
            max_length_q=inputs.max_len,
            max_length_k=inputs.max_len,
            packed=meta,
        ).last_hidden_state
        return hidden[0]

    @contextlib.contextmanager
    def _uncast(self) -> Iterator[None]:
        """PEFT's ``disable_input_dtype_casting`` without walking the model every step."""
        for layer in self.uncast_layers:
            setattr(layer, "cast_input_dtype_enabled", False)  # noqa: B010
        try:
            yield
        finally:
            for layer in self.uncast_layers:
                setattr(layer, "cast_input_dtype_enabled", True)  # noqa: B010


def _peft_tuner_layers(hf_model: nn.Module) -> list[nn.Module]:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return []
    return [m for m in hf_model.modules() if isinstance(m, BaseTunerLayer)]
