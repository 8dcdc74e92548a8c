"""Tiny random models and examples for the worker's engine tests (CPU, seconds)."""

from __future__ import annotations

import random
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from worker.training.attention import PACKED_ATTENTION, EngineKind, register_packed_attention
from worker.training.example import IGNORE_INDEX, Example
from worker.training.forward_backward import StepOutput, make_step_fn
from worker.training.model_loading import upcast_trainable

CPU = torch.device("cpu")
VOCAB = 256
LOSS_RTOL = 1e-5
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6
VARIED = [5, 31, 12, 2, 20]  # one step of sequences of very different lengths


def tiny_config(model_type: str = "qwen2", **overrides: Any) -> Any:
    """A 2-layer GQA config of `model_type` with tied embeddings."""
    options: dict[str, Any] = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
    )  # fmt: skip
    if model_type == "qwen3":
        options["head_dim"] = 16
    if model_type == "mistral":
        options["sliding_window"] = None
    options.update(overrides)
    return AutoConfig.for_model(model_type, **options)


def tiny_lora_model(
    attn_implementation: str = PACKED_ATTENTION,
    *,
    modules_to_save: list[str] | None = None,
    dropout: float = 0.0,
    model_type: str = "qwen2",
    dtype: torch.dtype = torch.float32,
    **config: Any,
) -> Any:
    """A random 2-layer model with LoRA on all linears (lora_B non-zero), trained params in fp32."""
    if attn_implementation == PACKED_ATTENTION:
        register_packed_attention()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        tiny_config(model_type, **config), attn_implementation=attn_implementation, dtype=dtype
    )
    lora = LoraConfig(
        r=8, lora_alpha=32, lora_dropout=dropout, target_modules="all-linear", modules_to_save=modules_to_save
    )
    peft_model = get_peft_model(model, lora)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero, which would leave A's gradient zero
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    upcast_trainable(peft_model)
    peft_model.train()
    return peft_model


def make_examples(lengths: list[int], *, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    examples = []
    for length in lengths:
        ids = [rng.randrange(3, VOCAB) for _ in range(length)]
        prompt = length // 3
        examples.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return examples


def grads_of(model: nn.Module) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(grads) == sum(p.requires_grad for p in model.parameters())
    return grads


def run_step(
    model: nn.Module, kind: EngineKind, examples: list[Example], **options: Any
) -> tuple[StepOutput, dict[str, torch.Tensor]]:
    out = make_step_fn(model, kind=kind, device=CPU, **options)(examples)
    return out, grads_of(model)


def assert_same(
    out: StepOutput, grads: dict[str, torch.Tensor], ref_out: StepOutput, ref_grads: dict[str, torch.Tensor]
) -> None:
    assert (out.num_tokens, out.num_loss_tokens) == (ref_out.num_tokens, ref_out.num_loss_tokens)
    assert abs(out.loss.item() - ref_out.loss.item()) <= LOSS_RTOL * abs(ref_out.loss.item())
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=name)


def loss_runs(tokenizer: Any, example: Example) -> list[str]:
    """Decode each contiguous run of loss tokens."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in example.labels:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return [tokenizer.decode(run) for run in runs]
