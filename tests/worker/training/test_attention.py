"""Packed attention is used only where it is verified, never silently attends across sequences,
and honours or refuses a model's attention scale."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, MistralConfig, Qwen2Config

from tests.worker.helpers import CPU, VARIED, assert_same, make_examples, run_step, tiny_config, tiny_lora_model
from tests.worker.training.test_step import strict_kernel
from worker.training.attention import (
    PACKED_ATTENTION,
    PACKED_MODEL_TYPES,
    engine_attn_implementation,
    packed_attention_forward,
    packed_step,
    packing_unsupported,
    pick_attn_implementation,
    torch_varlen_kernel,
)
from worker.training.forward_backward import make_step_fn


@pytest.mark.parametrize("model_type", sorted(PACKED_MODEL_TYPES))
def test_every_allowed_model_type_trains_packed_exactly_like_the_reference(model_type: str) -> None:
    """The allow-list is what this proves: each type passes the packed metadata through to attention."""
    assert packing_unsupported(tiny_config(model_type)) is None
    examples = make_examples(VARIED)
    ref = run_step(tiny_lora_model("sdpa", model_type=model_type), "reference", examples)
    fast = run_step(tiny_lora_model(model_type=model_type), "fast", examples)
    assert_same(*fast, *ref)


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        (Gemma2Config(), "not verified"),  # soft-capping, sliding windows
        (tiny_config("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=0), "layer types"),
        (MistralConfig(), "sliding_window=4096"),  # Mistral's default config slides
        (tiny_config("llama", logits_scaling=2.0), "logits_scaling=2.0"),
        (tiny_config("qwen2", layer_types=["full_attention", "sliding_attention"]), "layer types"),
    ],
)
def test_models_not_verified_for_packing_are_refused(config: Any, reason: str) -> None:
    assert reason in str(packing_unsupported(config))


def test_qwen2_5_shape_is_packed() -> None:
    assert packing_unsupported(Qwen2Config()) is None  # full attention everywhere, plain head


def test_attention_without_packed_metadata_inside_a_packed_step_raises() -> None:
    model = tiny_lora_model()
    query = key = value = torch.zeros(1, 4, 6, 16)
    attention = model.get_base_model().model.layers[0].self_attn
    with packed_step(), pytest.raises(RuntimeError, match="without packed-sequence metadata"):
        packed_attention_forward(attention, query, key, value, None)
    out, _ = packed_attention_forward(attention, query, key, value, None)  # outside a step: plain sdpa
    assert out.shape == (1, 6, 4, 16)


def test_a_decoder_that_drops_the_metadata_makes_the_step_fail() -> None:
    """A model whose layers do not forward attention kwargs would mix sequences: the step raises."""
    model = tiny_lora_model()
    attention = model.get_base_model().model.layers[0].self_attn
    forward = attention.forward

    def dropping(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        kept = {k: v for k, v in kwargs.items() if not k.startswith(("cu_seq", "max_length", "packed"))}
        return forward(hidden_states, *args, **kept)

    attention.forward = dropping
    with pytest.raises(RuntimeError, match="without packed-sequence metadata"):
        make_step_fn(model, kind="fast", device=CPU)(make_examples(VARIED))


def test_a_mistral_sliding_window_is_refused_before_packing() -> None:
    model = tiny_lora_model(model_type="mistral", sliding_window=4)
    with pytest.raises(ValueError, match="sliding_window=4"):
        make_step_fn(model, kind="fast", device=CPU)


def test_custom_attention_scale_is_honoured() -> None:
    """A scale other than 1/sqrt(head_dim) reaches every kernel path and matches the reference."""
    examples = make_examples(VARIED)
    ref_model = tiny_lora_model("sdpa")
    model = tiny_lora_model()
    for m in (ref_model, model):
        for layer in m.get_base_model().model.layers:
            layer.self_attn.scaling = 0.5
    ref = run_step(ref_model, "reference", examples)
    assert_same(*run_step(model, "fast", examples), *ref)
    default = run_step(tiny_lora_model("sdpa"), "reference", examples)[0]
    assert abs(default.loss.item() - ref[0].loss.item()) > 1e-4  # the scale does change the result


def test_a_kernel_without_a_scale_parameter_refuses_a_custom_scale() -> None:
    def no_scale(q: Any, k: Any, v: Any, cu_q: Any, cu_k: Any, max_q: int, max_k: int, *,
                 window_size: tuple[int, int] = (-1, -1), enable_gqa: bool = False) -> torch.Tensor:  # fmt: skip
        raise AssertionError("never reached")

    kernel = torch_varlen_kernel(no_scale, name="old_varlen")
    q = k = v = torch.zeros(6, 4, 16, dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match="old_varlen takes no attention scale"):
        kernel.call(q, k, v, torch.tensor([0, 6], dtype=torch.int32), 6, 0.5, 0.0)


def test_kernel_with_attention_dropout_falls_back_to_sdpa_per_sequence() -> None:
    kernel, fake = strict_kernel()
    model = tiny_lora_model(modules_to_save=["lm_head", "embed_tokens"], dtype=torch.bfloat16, attention_dropout=0.1)
    out = make_step_fn(model, kind="fast", device=CPU, kernel=kernel)(make_examples(VARIED))
    assert torch.isfinite(out.loss) and fake.calls == []  # torch's varlen kernel has no dropout


def test_pick_attn_implementation_falls_back_without_cuda() -> None:
    implementation, warning = pick_attn_implementation("flash_attention_2", CPU)
    assert implementation == "sdpa" and warning is not None and "sdpa" in warning
    assert pick_attn_implementation("sdpa", CPU) == ("sdpa", None)
    assert engine_attn_implementation("reference", "flash_attention_2", CPU)[0] == "sdpa"
    assert engine_attn_implementation("fast", "flash_attention_2", CPU)[0] == PACKED_ATTENTION


def test_model_loaded_for_fast_engine_still_does_padded_inference(tiny_model_dir: Path) -> None:
    """Loaded with PACKED_ATTENTION, a normal padded forward (e.g. generate) equals sdpa's."""
    implementation, _ = engine_attn_implementation("fast", "flash_attention_2", CPU)
    packed = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=implementation)
    sdpa = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    input_ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with torch.no_grad():
        got = packed(input_ids=input_ids, attention_mask=attention_mask).logits
        want = sdpa(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(got[attention_mask.bool()], want[attention_mask.bool()])
