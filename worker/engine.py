"""Step functions: forward + backward of one optimizer step's sequences on a PEFT causal LM.

Two engines share one contract (`StepFn`: sequences in, `StepOutput` out, gradients accumulated
on the trainable parameters, no optimizer step):

- ``"reference"``: the plain way. Right-padded batch with an attention mask, the model's full
  logits, shifted cross-entropy averaged over the loss tokens.
- ``"fast"``: the step's sequences packed into one row without padding, each with its own
  ``position_ids``; attention kept per sequence by varlen kernels where there are any
  (flash-attn, or PyTorch's own ``varlen_attn`` on CUDA), else one causal ``sdpa`` call per
  sequence; the decoder's last hidden states gathered at the positions that carry loss (indices
  built on the host while packing) and pushed through the LM head and cross-entropy in
  checkpointed chunks, so full-vocabulary logits never exist. No host sync in the step.

Load the model with `engine_attn_implementation(kind, requested, device)` so the fast engine gets
its attention path. See docs/performance.md for why these are the levers.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from worker.example import IGNORE_INDEX, Example

logger = logging.getLogger(__name__)

EngineKind = Literal["fast", "reference"]

PACKED_ATTENTION = "lora_server_packed"  # our attention implementation, registered with transformers
LOSS_CHUNK_ROWS = 4096  # loss rows per LM-head chunk: 4096 x 151,936 fp32 logits ~ 2.5 GB transient
PAD_ID = 0  # filler token id for padding (masked out / in its own segment, never in the loss)


@dataclass(frozen=True, slots=True)
class StepOutput:
    """What one step returns. `loss` stays on the device (reading it is a host sync)."""

    loss: torch.Tensor  # 0-dim: mean cross-entropy over the step's loss tokens
    num_tokens: int  # real (non-padding) tokens in the step
    num_loss_tokens: int  # tokens predicted with a label, i.e. terms of the mean


StepFn = Callable[[Sequence[Example]], StepOutput]


# --------------------------------------------------------------------------- attention choice


def pick_attn_implementation(requested: str, device: torch.device) -> tuple[str, str | None]:
    """The implementation to load with for `requested`, and a warning when it had to fall back.

    flash_attention_2/3 need CUDA and the flash-attn package; without them we use ``sdpa``.
    """
    if not requested.startswith("flash_attention"):
        return requested, None
    if device.type != "cuda":
        return "sdpa", f"attn_implementation={requested} needs a CUDA GPU; using sdpa instead"
    if not _flash_attn_installed(requested):
        return "sdpa", f"attn_implementation={requested}: flash-attn is not installed; using sdpa instead"
    return requested, None


def engine_attn_implementation(kind: EngineKind, requested: str, device: torch.device) -> tuple[str, str | None]:
    """The ``attn_implementation`` to load the model with for engine `kind`, plus any warning.

    The reference engine uses what was asked for (with the flash -> sdpa fallback). The fast
    engine keeps flash-attn when it is usable (transformers' varlen path) and otherwise uses
    `PACKED_ATTENTION`, registered here, which runs PyTorch's varlen flash kernel on CUDA
    (bf16/fp16) and per-sequence causal sdpa elsewhere. Outside a packed step it behaves like sdpa.
    """
    implementation, warning = pick_attn_implementation(requested, device)
    if kind == "reference" or implementation.startswith("flash_attention"):
        return implementation, warning
    register_packed_attention()
    if warning is not None:
        warning = warning.replace("using sdpa instead", "using PyTorch's attention kernels instead")
    return PACKED_ATTENTION, warning


def register_packed_attention() -> None:
    """Register `PACKED_ATTENTION` with transformers (idempotent; needed before loading with it)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, _packed_attention_forward)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)


def _flash_attn_installed(implementation: str) -> bool:
    package = "flash_attn_interface" if implementation == "flash_attention_3" else "flash_attn"
    return importlib.util.find_spec(package) is not None


@dataclass(frozen=True)
class _Varlen:
    """PyTorch's ``varlen_attn`` (torch >= 2.10) and the keywords its version takes."""

    function: Callable[..., torch.Tensor]
    params: frozenset[str]


def _torch_varlen(device: torch.device, dtype: torch.dtype) -> _Varlen | None:
    """The varlen kernel when it runs here: CUDA, sm80+, bf16/fp16, torch >= 2.10. Else None."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    if torch.cuda.get_device_capability(device) < (8, 0):
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return _Varlen(varlen_attn, frozenset(inspect.signature(varlen_attn).parameters))  # type: ignore[arg-type]


def _packed_attention_forward(
    module: nn.Module,
    query: torch.Tensor,  # (1, heads, T, head_dim)
    key: torch.Tensor,  # (1, kv_heads, T, head_dim)
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention within each packed sequence; plain sdpa when not called from a packed step.

    The packed step passes ``cu_seq_lens_q`` / ``max_length_q`` and either ``packed_varlen``
    (the kernel to use) or ``packed_seq_lens`` (host lengths for one sdpa call per sequence).
    """
    varlen: _Varlen | None = kwargs.pop("packed_varlen", None)
    seq_lens: tuple[int, ...] | None = kwargs.pop("packed_seq_lens", None)
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if varlen is not None and cu_seqlens is not None and dropout == 0.0:
        return _varlen_attention(varlen, query, key, value, cu_seqlens, kwargs["max_length_q"], scaling), None

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seqlens is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if seq_lens is None:
        raise RuntimeError("packed attention without a varlen kernel needs packed_seq_lens")
    outputs = [
        sdpa_attention_forward(module, q, k, v, None, dropout=dropout, scaling=scaling, is_causal=True)[0]
        for q, k, v in zip(
            query.split(seq_lens, dim=2), key.split(seq_lens, dim=2), value.split(seq_lens, dim=2), strict=True
        )
    ]
    return torch.cat(outputs, dim=1), None


def _varlen_attention(
    varlen: _Varlen,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_len: int,
    scaling: float | None,
) -> torch.Tensor:
    """PyTorch's varlen flash kernel over (1, H, T, D) tensors; returns (1, T, H, D)."""
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))  # (T, H, D)
    options: dict[str, Any] = {}
    if "window_size" in varlen.params:  # torch > 2.10
        options["window_size"] = (-1, 0)
    else:  # torch 2.10
        options["is_causal"] = True
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in varlen.params:
            options["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if scaling is not None and "scale" in varlen.params:
        options["scale"] = scaling
    out = varlen.function(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, **options)
    return out.unsqueeze(0)


# --------------------------------------------------------------------------- packing


@dataclass(frozen=True, slots=True)
class PackedBatch:
    """A step's sequences laid end to end in one row, with everything the fast step needs."""

    input_ids: list[int]
    position_ids: list[int]
    segment_ids: list[int]  # which sequence each position belongs to
    seq_lens: tuple[int, ...]  # including a trailing filler segment when padded to a bucket
    loss_rows: list[int]  # row of the packed hidden states predicting each target
    targets: list[int]  # IGNORE_INDEX only for bucket filler rows
    num_tokens: int
    num_loss_tokens: int


def pack_examples(examples: Sequence[Example], *, pad_to_multiple: int | None = None) -> PackedBatch:
    """Pack `examples` into one row. Position i of a sequence predicts its label i+1.

    With `pad_to_multiple`, the row and the loss rows are padded up to a multiple of it (a filler
    segment that attends only to itself, and ignored loss rows), so shapes repeat across steps.
    """
    input_ids: list[int] = []
    position_ids: list[int] = []
    segment_ids: list[int] = []
    loss_rows: list[int] = []
    targets: list[int] = []
    seq_lens: list[int] = []
    for segment, example in enumerate(examples):
        offset, length = len(input_ids), len(example.input_ids)
        input_ids.extend(example.input_ids)
        position_ids.extend(range(length))
        segment_ids.extend([segment] * length)
        seq_lens.append(length)
        for i, label in enumerate(example.labels[1:]):
            if label != IGNORE_INDEX:
                loss_rows.append(offset + i)
                targets.append(label)
    num_tokens, num_loss_tokens = len(input_ids), len(targets)
    if pad_to_multiple:
        filler = -num_tokens % pad_to_multiple
        if filler:
            input_ids.extend([PAD_ID] * filler)
            position_ids.extend(range(filler))
            segment_ids.extend([len(seq_lens)] * filler)
            seq_lens.append(filler)
        extra = -num_loss_tokens % pad_to_multiple
        loss_rows.extend([0] * extra)
        targets.extend([IGNORE_INDEX] * extra)
    return PackedBatch(
        input_ids, position_ids, segment_ids, tuple(seq_lens), loss_rows, targets, num_tokens, num_loss_tokens
    )


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """One host->device copy of int64 values (pinned + non_blocking on CUDA: no sync)."""
    tensor = torch.tensor(values, dtype=torch.long)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def count_loss_tokens(example: Example) -> int:
    """Labels that are predicted (the first position has no context, so it never is)."""
    return sum(1 for label in example.labels[1:] if label != IGNORE_INDEX)


# --------------------------------------------------------------------------- loss


def _cross_entropy_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_lm_loss_sum(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_rows: int = LOSS_CHUNK_ROWS
) -> torch.Tensor:
    """Sum of cross-entropy of ``head(hidden)`` against `targets`, `chunk_rows` rows at a time.

    Each chunk runs under activation checkpointing, so its logits are freed after the forward
    and recomputed in the backward: at most one chunk of logits is ever alive. Works for any
    head module (plain Linear, tied, PEFT ModulesToSaveWrapper or LoRA-wrapped).
    """
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0  # keeps the graph so backward() works; all grads zero
    total: torch.Tensor | None = None
    for start in range(0, hidden.shape[0], chunk_rows):
        part = checkpoint(
            _cross_entropy_sum,
            head,
            hidden[start : start + chunk_rows],
            targets[start : start + chunk_rows],
            use_reentrant=False,
        )
        total = part if total is None else total + part
    assert total is not None
    return total


# --------------------------------------------------------------------------- step functions


def make_step_fn(
    model: nn.Module,
    *,
    kind: EngineKind,
    device: torch.device,
    compile: bool = False,
    pad_to_multiple: int | None = None,
    loss_chunk_rows: int = LOSS_CHUNK_ROWS,
) -> StepFn:
    """A function running forward + backward for one optimizer step's sequences.

    `model`: a PEFT-wrapped (or plain) Hugging Face causal LM already on `device`, in train mode.
    Both engines run under bf16 autocast when the model is bf16 on CUDA.

    Fast-engine options (measure on the GPU before turning them on by default): `compile`
    compiles each decoder layer in place with ``torch.compile(dynamic=True)`` (with PyTorch's
    varlen kernel on CUDA, or a model loaded with sdpa; skipped for per-sequence sdpa);
    `pad_to_multiple` pads the packed row and the loss rows up to a multiple (shape bucketing).
    """
    hf_model = _unwrap(model)
    autocast = autocast_dtype(hf_model, device)
    if kind == "reference":
        return functools.partial(_reference_step, model, device, autocast)
    if kind != "fast":
        raise ValueError(f"unknown engine {kind!r}")
    step = _FastStep(hf_model, device, autocast, pad_to_multiple, loss_chunk_rows)
    if compile:
        if step.attention == "packed" and step.varlen is None:
            logger.warning("compile skipped: per-sequence sdpa (no varlen kernel here) does not compile")
        else:
            step.compiled = True
            for layer in _decoder_layers(hf_model):
                layer.compile(dynamic=True)
    return step


def _unwrap(model: nn.Module) -> Any:
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _decoder_layers(hf_model: Any) -> list[nn.Module]:
    layers = getattr(hf_model.get_decoder(), "layers", None)
    return list(layers) if layers is not None else []


def autocast_dtype(hf_model: Any, device: torch.device) -> torch.dtype | None:
    """Autocast to the frozen base weights' half dtype on CUDA, else none.

    Trainable parameters (LoRA and fully trained modules) are kept in fp32 by the caller, so the
    frozen weights, not `hf_model.dtype`, say what the matmuls run in. fp16 runs without a grad
    scaler: the fp32 master weights keep Adam's states from underflowing, small activation
    gradients may still flush to zero (prefer bf16 where the GPU has it, which `auto` does).
    """
    if device.type != "cuda":
        return None
    frozen = next((p.dtype for p in hf_model.parameters() if not p.requires_grad and p.is_floating_point()), None)
    return frozen if frozen in (torch.bfloat16, torch.float16) else None


def _autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)


def _reference_step(
    model: nn.Module, device: torch.device, autocast: torch.dtype | None, examples: Sequence[Example]
) -> StepOutput:
    width = max(len(e.input_ids) for e in examples)
    ids, mask, labels = [], [], []
    for e in examples:
        filler = width - len(e.input_ids)
        ids.extend(e.input_ids + [PAD_ID] * filler)
        mask.extend([1] * len(e.input_ids) + [0] * filler)
        labels.extend(e.labels + [IGNORE_INDEX] * filler)
    shape = (len(examples), width)
    num_loss_tokens = sum(count_loss_tokens(e) for e in examples)
    label_tensor = _to_device(labels, device).view(shape)
    with _autocast(device, autocast):
        logits = model(
            input_ids=_to_device(ids, device).view(shape),
            attention_mask=_to_device(mask, device).view(shape),
            use_cache=False,
        ).logits
    logits = logits.float()
    loss_sum = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        label_tensor[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    loss = loss_sum / max(num_loss_tokens, 1)
    loss.backward()
    return StepOutput(loss.detach(), sum(len(e.input_ids) for e in examples), num_loss_tokens)


class _FastStep:
    """Packed, padding-free forward + backward with the loss computed only where it counts."""

    def __init__(
        self,
        hf_model: Any,
        device: torch.device,
        autocast: torch.dtype | None,
        pad_to_multiple: int | None,
        loss_chunk_rows: int,
    ) -> None:
        self.decoder = hf_model.get_decoder()
        self.head = hf_model.get_output_embeddings()
        self.device = device
        self.autocast = autocast
        self.pad_to_multiple = pad_to_multiple
        self.loss_chunk_rows = loss_chunk_rows
        config = hf_model.config
        self.layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
        self.attention = _attention_mode(config._attn_implementation)
        self.compiled = False  # layers compiled: varlen only, max_len rounded up to a power of two
        compute_dtype = autocast or hf_model.dtype
        self.varlen = _torch_varlen(device, compute_dtype) if self.attention == "packed" else None
        # Under autocast PEFT's cast of each LoRA input to the fp32 adapter dtype is a wasted round
        # trip (autocast casts it straight back to bf16 for the matmul): two kernels per adapter.
        self.uncast_layers = _peft_tuner_layers(hf_model) if autocast is not None else []

    def __call__(self, examples: Sequence[Example]) -> StepOutput:
        packed = pack_examples(examples, pad_to_multiple=self.pad_to_multiple)
        total, n_rows = len(packed.input_ids), len(packed.loss_rows)
        cu_seqlens = [0]
        for length in packed.seq_lens:
            cu_seqlens.append(cu_seqlens[-1] + length)
        flat = _to_device(
            packed.input_ids
            + packed.position_ids
            + packed.loss_rows
            + packed.targets
            + cu_seqlens
            + (packed.segment_ids if self.attention == "dense" else []),
            self.device,
        )
        input_ids, position_ids, loss_rows, targets, rest = flat.split(
            [total, total, n_rows, n_rows, flat.numel() - 2 * total - 2 * n_rows]
        )
        attention_kwargs, mask = self._attention_inputs(packed, rest, total)
        with _autocast(self.device, self.autocast), _input_casting_off(self.uncast_layers):
            hidden = self.decoder(
                input_ids=input_ids.view(1, total),
                position_ids=position_ids.view(1, total),
                attention_mask={layer_type: mask for layer_type in self.layer_types},
                use_cache=False,
                **attention_kwargs,
            ).last_hidden_state
            loss_sum = chunked_lm_loss_sum(
                self.head, hidden[0].index_select(0, loss_rows), targets, self.loss_chunk_rows
            )
        loss = loss_sum / max(packed.num_loss_tokens, 1)
        loss.backward()
        return StepOutput(loss.detach(), packed.num_tokens, packed.num_loss_tokens)

    def _attention_inputs(
        self, packed: PackedBatch, rest: torch.Tensor, total: int
    ) -> tuple[dict[str, Any], torch.Tensor | None]:
        """Keyword arguments for the attention layers, and the 4D mask (dense mode only)."""
        n_cu = len(packed.seq_lens) + 1
        if self.attention == "dense":
            segments = rest[n_cu:]
            index = torch.arange(total, device=self.device)
            allowed = (segments[:, None] == segments[None, :]) & (index[:, None] >= index[None, :])
            return {}, allowed.view(1, 1, total, total)
        cu_seqlens = rest[:n_cu].to(torch.int32)
        max_len = max(packed.seq_lens)
        if self.compiled:  # an over-estimate is fine for the kernels; fewer distinct values
            max_len = 1 << (max_len - 1).bit_length()
        kwargs: dict[str, Any] = {
            "cu_seq_lens_q": cu_seqlens,
            "cu_seq_lens_k": cu_seqlens,
            "max_length_q": max_len,
            "max_length_k": max_len,
        }
        if self.varlen is not None:
            kwargs["packed_varlen"] = self.varlen
        if self.attention == "packed" and not self.compiled:  # a host tuple would recompile every step
            kwargs["packed_seq_lens"] = packed.seq_lens  # per-sequence sdpa when varlen can't run
        return kwargs, None


def _peft_tuner_layers(hf_model: nn.Module) -> list[nn.Module]:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return []
    return [m for m in hf_model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def _input_casting_off(layers: list[nn.Module]) -> Iterator[None]:
    """PEFT's ``disable_input_dtype_casting`` without walking the model every step."""
    for layer in layers:
        setattr(layer, "cast_input_dtype_enabled", False)  # noqa: B010
    try:
        yield
    finally:
        for layer in layers:
            setattr(layer, "cast_input_dtype_enabled", True)  # noqa: B010


def _attention_mode(implementation: str) -> Literal["flash", "packed", "dense"]:
    if implementation.startswith("flash_attention"):
        return "flash"  # transformers' flash path with cu_seq_lens: varlen, no mask
    if implementation == PACKED_ATTENTION:
        return "packed"
    if implementation == "sdpa":
        logger.warning(
            "fast engine on a model loaded with sdpa: using a dense block-diagonal mask (O(T^2)); "
            "load with engine_attn_implementation('fast', ...) for varlen attention"
        )
        return "dense"
    raise ValueError(
        f"the fast engine cannot pack sequences with attn_implementation={implementation!r}; "
        "load the model with engine_attn_implementation('fast', ...)"
    )
