"""The fast step computes what the reference computes, in fp32 exactly and in the GPU's precision setup.

Tolerances (fp32 on CPU, LoRA dropout 0): step loss equal to 1e-5 relative; every trainable
parameter's gradient `allclose(rtol=1e-4, atol=1e-6)` to the reference's (observed differences are
~1e-7 against gradients of ~1e-1). bf16: loss within 1 % and each gradient within 5 % of its
largest entry (bf16 keeps 8 bits of mantissa).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from tests.worker.helpers import (
    CPU,
    LOSS_RTOL,
    VARIED,
    assert_same,
    grads_of,
    make_examples,
    run_step,
    tiny_lora_model,
)
from worker.training.attention import VarlenKernel, torch_varlen_kernel
from worker.training.example import IGNORE_INDEX, Example
from worker.training.forward_backward import FastStep, cast_embedding_output, make_step_fn

SEED_MODULES_TO_SAVE = ["lm_head", "embed_tokens"]


@pytest.mark.parametrize("modules_to_save", [None, SEED_MODULES_TO_SAVE])
def test_fast_step_matches_reference_loss_and_gradients(modules_to_save: list[str] | None) -> None:
    examples = make_examples(VARIED)
    ref_out, ref_grads = run_step(tiny_lora_model("sdpa", modules_to_save=modules_to_save), "reference", examples)
    out, grads = run_step(tiny_lora_model(modules_to_save=modules_to_save), "fast", examples)
    assert ref_out.num_tokens == sum(VARIED)
    assert len(grads) == (28 if modules_to_save is None else 30)  # 2 layers x 7 linears x (A, B) + copies
    assert all(g.abs().max() > 0 for g in grads.values())
    assert_same(out, grads, ref_out, ref_grads)


def test_packed_loss_is_token_weighted_mean_of_sequences_alone() -> None:
    """Packing keeps sequences apart: each one alone gives the same per-token losses."""
    examples = make_examples([7, 19, 3, 11])
    model = tiny_lora_model()
    packed = make_step_fn(model, kind="fast", device=CPU)(examples)
    singles = [make_step_fn(model, kind="reference", device=CPU)([e]) for e in examples]
    expected = sum(s.loss.item() * s.num_loss_tokens for s in singles) / sum(s.num_loss_tokens for s in singles)
    assert packed.loss.item() == pytest.approx(expected, rel=LOSS_RTOL)


def test_bucket_padding_and_small_loss_chunks_change_nothing() -> None:
    examples = make_examples(VARIED)
    ref = run_step(tiny_lora_model(), "fast", examples)
    padded = run_step(tiny_lora_model(), "fast", examples, pad_to_multiple=16, loss_chunk_rows=7)
    assert_same(*padded, *ref)


def test_step_without_loss_tokens_gives_zero_loss_and_gradients() -> None:
    examples = [Example([5, 6, 7], [IGNORE_INDEX] * 3)]
    for kind, attention in (("fast", "lora_server_packed"), ("reference", "sdpa")):
        out, grads = run_step(tiny_lora_model(attention), kind, examples)  # type: ignore[arg-type]
        assert out.loss.item() == 0.0 and out.num_loss_tokens == 0
        assert all(g.abs().max() == 0 for g in grads.values())


def test_both_engines_report_the_token_accuracy_of_full_logits() -> None:
    """Labels made the model's own argmax at every other position: both engines count exactly those."""
    model = tiny_lora_model()
    examples = []
    for example in make_examples([9, 14, 6, 21]):
        with torch.no_grad():
            predicted = model(input_ids=torch.tensor([example.input_ids])).logits[0].argmax(-1).tolist()
        labels = [
            label if label == IGNORE_INDEX or t % 2 else predicted[t - 1] for t, label in enumerate(example.labels)
        ]
        examples.append(Example(example.input_ids, labels))
    counted = [(t, e) for e in examples for t in range(1, len(e.labels)) if e.labels[t] != IGNORE_INDEX]
    want = sum(
        e.labels[t] == model_prediction
        for (t, e), model_prediction in zip(counted, _predictions(model, counted), strict=True)
    )
    assert 0 < want < len(counted)
    for kind, options in (("reference", {}), ("fast", {"loss_chunk_rows": 4})):
        out = make_step_fn(model, kind=kind, device=CPU, **options)(examples)  # type: ignore[arg-type]
        model.zero_grad(set_to_none=True)
        assert out.accuracy is not None
        assert out.accuracy.item() == pytest.approx(want / len(counted), abs=1e-6), kind


def _predictions(model: nn.Module, counted: list[tuple[int, Example]]) -> list[int]:
    with torch.no_grad():
        return [int(model(input_ids=torch.tensor([e.input_ids[:t]])).logits[0, -1].argmax()) for t, e in counted]


def test_fast_engine_refuses_a_model_not_loaded_for_packing() -> None:
    with pytest.raises(ValueError, match="attn_implementation"):
        make_step_fn(tiny_lora_model("sdpa"), kind="fast", device=CPU)


# --------------------------------------------------------------------------- the dtype contract


class StrictVarlen:
    """A CPU stand-in for the varlen kernels with `varlen_attn`'s signature that enforces what they do:
    q, k, v (T, H, D) of one dtype in {bf16, fp16}, contiguous, int32 cu_seqlens covering the row."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.dtype, int]] = []

    def __call__(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        cu_seq_q: torch.Tensor,
        cu_seq_k: torch.Tensor,
        max_q: int,
        max_k: int,
        *,
        scale: float | None = None,
        window_size: tuple[int, int] = (-1, -1),
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        if not (query.dtype == key.dtype == value.dtype) or query.dtype not in (torch.bfloat16, torch.float16):
            raise TypeError(f"varlen kernel: q {query.dtype}, k {key.dtype}, v {value.dtype}")
        if not all(t.is_contiguous() and t.dim() == 3 for t in (query, key, value)):
            raise ValueError("varlen kernel: q, k, v must be contiguous (T, H, D)")
        if cu_seq_q.dtype != torch.int32 or cu_seq_k.dtype != torch.int32:
            raise TypeError(f"varlen kernel: cu_seqlens must be int32, got {cu_seq_q.dtype}")
        bounds = cu_seq_q.tolist()
        if bounds[0] != 0 or bounds[-1] != query.shape[0] or max_q < max(b - a for a, b in itertools.pairwise(bounds)):
            raise ValueError(f"varlen kernel: bad cu_seqlens {bounds} / max_q {max_q} for {query.shape[0]} rows")
        if window_size != (-1, 0):
            raise ValueError(f"varlen kernel: expected causal window (-1, 0), got {window_size}")
        if key.shape[1] != query.shape[1] and not enable_gqa:
            raise ValueError("varlen kernel: GQA without enable_gqa")
        self.calls.append((query.dtype, max_q))
        outputs = []
        for start, end in itertools.pairwise(bounds):
            q, k, v = (t[start:end].transpose(0, 1).float() for t in (query, key, value))
            out = nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scale, enable_gqa=enable_gqa
            )
            outputs.append(out.transpose(0, 1).to(query.dtype))
        return torch.cat(outputs)


def strict_kernel() -> tuple[VarlenKernel, StrictVarlen]:
    fake = StrictVarlen()
    return torch_varlen_kernel(fake, name="strict"), fake


def bf16_seed_model(attention: str = "lora_server_packed") -> nn.Module:
    """The seed's defaults as a GPU job runs them: bf16 base, fp32 LoRA and fp32 lm_head + embed_tokens."""
    return tiny_lora_model(attention, modules_to_save=SEED_MODULES_TO_SAVE, dtype=torch.bfloat16)


def test_seed_defaults_in_bf16_give_the_kernel_one_half_dtype_and_match_reference() -> None:
    kernel, fake = strict_kernel()
    examples = make_examples(VARIED)
    model = bf16_seed_model()
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    out = make_step_fn(model, kind="fast", device=CPU, kernel=kernel)(examples)
    grads = grads_of(model)
    assert fake.calls == [(torch.bfloat16, max(VARIED))] * 2  # once per layer, bf16 q/k/v
    ref_model = bf16_seed_model("sdpa")
    ref_out = make_step_fn(ref_model, kind="reference", device=CPU)(examples)
    ref_grads = grads_of(ref_model)
    assert out.loss.item() == pytest.approx(ref_out.loss.item(), rel=1e-2)
    for name, grad in grads.items():
        assert grad.dtype == torch.float32
        scale = ref_grads[name].abs().max()
        assert scale > 0 and (grad - ref_grads[name]).abs().max() <= 0.05 * scale, name


def test_without_the_embedding_cast_the_kernel_refuses_mixed_dtypes() -> None:
    """What a real GPU does to a trained fp32 embedding feeding a bf16 decoder: the contract is needed."""
    kernel, _ = strict_kernel()
    model = bf16_seed_model()
    step = make_step_fn(model, kind="fast", device=CPU, kernel=kernel)
    cast_embedding_output(model.get_base_model(), None)
    with pytest.raises(TypeError, match=r"float32, torch\.float32, torch\.bfloat16"):  # q, k fp32; v bf16
        step(make_examples(VARIED))


def test_fast_step_uses_the_kernel_for_every_layer_in_fp16_too() -> None:
    kernel, fake = strict_kernel()
    model = tiny_lora_model(modules_to_save=SEED_MODULES_TO_SAVE, dtype=torch.float16)
    step = make_step_fn(model, kind="fast", device=CPU, kernel=kernel)
    assert isinstance(step, FastStep) and step.kernel is kernel
    out = step(make_examples([9, 4]))
    assert torch.isfinite(out.loss) and fake.calls == [(torch.float16, 9)] * 2
