"""Attention for packed steps: which models may be packed, which kernel runs, and what it is given.

The fast engine lays a step's sequences end to end in one row. That is only correct if every
attention call keeps the sequences apart, so:

- Only model types verified to hand the packed metadata (``cu_seq_lens_q`` & co.) through to the
  attention function are packed (`packing_unsupported`: an allow-list, plus per-config checks for
  sliding windows, logit scaling/soft-capping and attention scales).
- The attention function registered as `PACKED_ATTENTION` raises when it is called inside a packed
  step without that metadata, or with a sliding window, instead of attending across sequences.
- The kernels (flash-attn's varlen function, PyTorch's ``varlen_attn``) get q, k, v of one dtype in
  {bf16, fp16}, contiguous, (T, H, D), with int32 ``cu_seqlens``: what both kernels require (neither
  autocasts). `check_kernel_inputs` states that contract; the step keeps it by running the decoder
  in the compute dtype (see `worker.training.forward_backward`).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

PACKED_ATTENTION = "lora_server_packed"  # our attention implementation, registered with transformers
KERNEL_DTYPES = (torch.bfloat16, torch.float16)

EngineKind = Literal["fast", "reference"]

# Model types whose decoder passes attention kwargs (cu_seq_lens_*, max_length_*) unchanged to the
# attention function and whose loss is the plain LM head (each is covered by tests/worker/test_attention.py).
PACKED_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral"})


def packing_unsupported(model_config: Any) -> str | None:
    """Why this model must not be trained packed (None when it may be).

    The fast engine applies the LM head itself and keeps each packed sequence whole, so it needs a
    verified model type, no sliding-window layer, no logit soft-capping or scaling, no hybrid layers.
    """
    model_type = getattr(model_config, "model_type", None)
    if model_type not in PACKED_MODEL_TYPES:
        return f"model type {model_type!r} is not verified for packed training"
    for name in ("final_logit_softcapping", "attn_logit_softcapping"):
        if getattr(model_config, name, None):
            return f"{name}={getattr(model_config, name)}"
    for name in ("logit_scale", "logits_scaling"):
        value = getattr(model_config, name, None)
        if value not in (None, 1, 1.0):
            return f"{name}={value}"
    layer_types = set(getattr(model_config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        return f"layer types {sorted(layer_types)} (only full attention is packed)"
    if getattr(model_config, "use_sliding_window", None) is True:
        return "sliding-window attention"
    if model_type == "mistral" and getattr(model_config, "sliding_window", None) is not None:
        return f"sliding_window={model_config.sliding_window}"
    return None


# --------------------------------------------------------------------------- implementation choice


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

    The reference engine uses what was asked for (with the flash -> sdpa fallback). The fast engine
    always loads with `PACKED_ATTENTION` (registered here), which picks its kernel per call:
    flash-attn's varlen function when installed, else PyTorch's ``varlen_attn`` on CUDA, else one
    causal sdpa call per sequence. Outside a packed step it behaves like sdpa (generation, eval).
    """
    implementation, warning = pick_attn_implementation(requested, device)
    if kind == "reference":
        return implementation, warning
    register_packed_attention()
    if warning is not None:
        warning = warning.replace("using sdpa instead", "using PyTorch's attention kernels instead")
    return PACKED_ATTENTION, warning


def register_packed_attention() -> None:
    """Register `PACKED_ATTENTION` with transformers (idempotent; needed before loading with it)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)


def _flash_attn_installed(implementation: str) -> bool:
    package = "flash_attn_interface" if implementation == "flash_attention_3" else "flash_attn"
    return importlib.util.find_spec(package) is not None


# --------------------------------------------------------------------------- kernels


@dataclass(frozen=True)
class VarlenKernel:
    """A variable-length causal attention kernel over (T, H, D) tensors.

    `call(q, k, v, cu_seqlens, max_len, scale, dropout)` returns (T, H, D). `supports_dropout`
    says whether it can apply attention dropout itself (else the step uses masked sdpa for it).
    """

    name: str
    call: Callable[..., torch.Tensor]
    supports_dropout: bool


def check_kernel_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    """What flash-attn's and PyTorch's varlen kernels require of their inputs (they don't autocast)."""
    dtypes = {q.dtype, k.dtype, v.dtype}
    if len(dtypes) != 1 or q.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"varlen attention needs q, k, v of one dtype in bf16/fp16, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous()):
        raise ValueError("varlen attention needs contiguous q, k, v")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"varlen attention needs int32 cu_seqlens, got {cu_seqlens.dtype}")


def select_varlen_kernel(device: torch.device, dtype: torch.dtype | None) -> VarlenKernel | None:
    """The varlen kernel that runs here in `dtype`, or None (CPU, fp32, pre-Ampere, no kernel)."""
    if device.type != "cuda" or dtype not in KERNEL_DTYPES:
        return None
    if torch.cuda.get_device_capability(device) < (8, 0):
        return None
    return _flash_attn_kernel() or _torch_varlen_kernel()


def _flash_attn_kernel() -> VarlenKernel | None:
    if importlib.util.find_spec("flash_attn") is None:
        return None
    from flash_attn import flash_attn_varlen_func

    def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int,
             scale: float, dropout: float) -> torch.Tensor:  # fmt: skip
        check_kernel_inputs(q, k, v, cu)
        out: torch.Tensor = flash_attn_varlen_func(
            q, k, v, cu, cu, max_len, max_len, dropout_p=dropout, softmax_scale=scale, causal=True
        )
        return out

    return VarlenKernel("flash_attn", call, supports_dropout=True)


def _torch_varlen_kernel() -> VarlenKernel | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return torch_varlen_kernel(varlen_attn)  # type: ignore[arg-type]  # returns a tuple only with return_aux


def torch_varlen_kernel(function: Callable[..., torch.Tensor], name: str = "torch_varlen") -> VarlenKernel:
    """Wrap a function with PyTorch's ``varlen_attn`` signature (2.10 or later) as a `VarlenKernel`."""
    params = frozenset(inspect.signature(function).parameters)

    def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int,
             scale: float, dropout: float) -> torch.Tensor:  # fmt: skip
        options: dict[str, Any] = {}
        if "window_size" in params:  # torch > 2.10
            options["window_size"] = (-1, 0)
        else:  # torch 2.10
            options["is_causal"] = True
        if k.shape[1] != q.shape[1]:
            if "enable_gqa" in params:
                options["enable_gqa"] = True
            else:
                groups = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if "scale" in params:
            options["scale"] = scale
        elif not math.isclose(scale, q.shape[-1] ** -0.5, rel_tol=1e-6):
            raise NotImplementedError(f"{name} takes no attention scale and this model uses {scale}")
        check_kernel_inputs(q, k, v, cu)
        return function(q, k, v, cu, cu, max_len, max_len, **options)

    return VarlenKernel(name, call, supports_dropout=False)


# --------------------------------------------------------------------------- the attention function


@dataclass(frozen=True)
class PackedMetadata:
    """What one packed forward gives every attention call (through the decoder's kwargs)."""

    kernel: VarlenKernel | None  # None: per-sequence sdpa (needs seq_lens) or masked sdpa
    seq_lens: tuple[int, ...] | None  # host lengths; None in static-shape steps (would change every step)
    segment_ids: torch.Tensor  # (T,) which sequence each position belongs to


_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("lora_server_packed_step", default=False)


@contextlib.contextmanager
def packed_step() -> Iterator[None]:
    """Mark a packed forward: attention without packed metadata then raises instead of mixing sequences."""
    token = _ACTIVE.set(True)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def packed_attention_forward(
    module: nn.Module,
    query: torch.Tensor,  # (1, heads, T, head_dim)
    key: torch.Tensor,  # (1, kv_heads, T, head_dim)
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention within each packed sequence; plain sdpa when not called from a packed step."""
    meta: PackedMetadata | None = kwargs.pop("packed", None)
    cu_seqlens: torch.Tensor | None = kwargs.get("cu_seq_lens_q")
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if meta is None or cu_seqlens is None:
        if _ACTIVE.get():
            raise RuntimeError(
                f"{type(module).__name__} was called without packed-sequence metadata inside a packed step; "
                "attending across sequences would be silently wrong"
            )
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if kwargs.get("sliding_window") is not None:
        raise NotImplementedError(f"packed attention with sliding_window={kwargs['sliding_window']}")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    kernel = meta.kernel
    if kernel is not None and (dropout == 0.0 or kernel.supports_dropout):
        q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))  # (T, H, D)
        out = kernel.call(q, k, v, cu_seqlens, kwargs["max_length_q"], scale, dropout)
        return out.unsqueeze(0), None
    groups = query.shape[1] // key.shape[1]
    if meta.seq_lens is not None:  # eager: one causal sdpa per sequence
        outputs = [
            F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, is_causal=True, scale=scale, enable_gqa=groups > 1
            ).transpose(1, 2)
            for q, k, v in zip(*(t.split(meta.seq_lens, dim=2) for t in (query, key, value)), strict=True)
        ]
        return torch.cat(outputs, dim=1), None
    # static shapes (compiled / captured) without a kernel for this case: one block-diagonal masked call
    segments = meta.segment_ids
    index = torch.arange(segments.shape[0], device=segments.device)
    allowed = (segments[:, None] == segments[None, :]) & (index[:, None] >= index[None, :])
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=allowed, dropout_p=dropout, scale=scale, enable_gqa=groups > 1
    )
    return out.transpose(1, 2), None
