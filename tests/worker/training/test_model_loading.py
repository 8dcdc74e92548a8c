"""Loading picks the dtype and engine a job trains with; preparing keeps trained weights fp32 and the
decoder in the compute dtype."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GemmaConfig, GemmaForCausalLM

from shared.config import TrainConfig
from shared.events import event_type
from worker.training.model_loading import apply_lora, load_base_model, prepare_model, resolve_dtype, upcast_trainable

CUDA = torch.device("cuda")  # resolve_dtype only asks the GPU when the config leaves the choice to it


@pytest.mark.parametrize(
    ("options", "device", "dtype"),
    [
        ({}, torch.device("cpu"), torch.float32),
        ({"train_arg_bf16": False}, CUDA, torch.float32),  # not fp16 without a loss scaler
        ({"train_arg_bf16": False, "train_arg_fp16": True}, CUDA, torch.float16),
        ({"train_arg_bf16": True}, torch.device("cpu"), torch.bfloat16),
        ({"model_load_torch_dtype": "float16"}, CUDA, torch.float16),
    ],
)
def test_resolve_dtype(options: dict[str, Any], device: torch.device, dtype: torch.dtype) -> None:
    assert resolve_dtype(TrainConfig(**options), device) == dtype


def test_trained_modules_are_kept_in_fp32_over_a_bf16_base(tiny_model_dir: Path) -> None:
    """The seed's modules_to_save (lm_head, embed_tokens) must not be optimised in bf16."""
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    model = apply_lora(base, TrainConfig(), None)
    assert any(p.requires_grad and p.dtype == torch.bfloat16 for p in model.parameters())  # what PEFT leaves
    upcast_trainable(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert all(p.dtype == torch.bfloat16 for p in frozen)


def test_prepared_model_embeds_in_the_compute_dtype(tiny_model_dir: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    model = prepare_model(base, TrainConfig())
    embedding = model.get_base_model().get_input_embeddings()
    assert all(p.dtype == torch.float32 for p in embedding.parameters() if p.requires_grad)
    assert embedding(torch.tensor([[1, 2, 3]])).dtype == torch.bfloat16


def test_a_model_not_verified_for_packing_trains_with_the_reference_engine(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    config = GemmaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16)  # fmt: skip
    GemmaForCausalLM(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path)
    events: list[tuple[str, str]] = []
    model, _, engine = load_base_model(
        TrainConfig(model_name=str(tmp_path)),
        torch.device("cpu"),
        lambda event, message: events.append((event_type(event), message)),
    )
    assert engine == "reference" and model.config._attn_implementation == "sdpa"
    assert (
        "warning",
        "model type 'gemma' is not verified for packed training: training with the reference engine",
    ) in events


def test_tiny_model_loads_for_the_fast_engine(tiny_model_dir: Path) -> None:
    model, _, engine = load_base_model(TrainConfig(model_name=str(tiny_model_dir)), torch.device("cpu"))
    assert engine == "fast" and model.config._attn_implementation == "lora_server_packed"
