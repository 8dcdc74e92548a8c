"""A Tinker training client's adapter: LoRA of the client's rank on the parts its `LoraConfig` names.

The SDK's `LoraConfig` trains the attention and MLP projections and the unembedding (the LM head) by
default, each switchable. The adapter has no dropout: a client's `forward` must return the same
log-probabilities its `forward_backward` trains on (importance ratios are computed from them).
"""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import PreTrainedModel

from worker.training.forward_backward import autocast_dtype, cast_embedding_output
from worker.training.model_loading import upcast_trainable

LORA_ALPHA = 32  # fixed, whatever the rank (as Tinker does): the learning rate, not alpha, is what clients tune
_ATTENTION_PARTS = (".self_attn.", ".attention.", ".attn.")
_MLP_PARTS = (".mlp.", ".feed_forward.", ".ffn.")


def target_modules(model: PreTrainedModel, *, attn: bool, mlp: bool, unembed: bool) -> list[str]:
    """The linear layers to adapt, by full name: the decoder's attention and MLP ones, and the LM head."""
    head = model.get_output_embeddings()
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        dotted = f".{name}."
        wanted = (
            (attn and any(p in dotted for p in _ATTENTION_PARTS))
            or (mlp and any(p in dotted for p in _MLP_PARTS))
            or (unembed and module is head)
        )
        if wanted:
            names.append(name)
    if not names:
        raise ValueError("the LoRA config trains nothing in this model (train_attn, train_mlp and train_unembed)")
    return names


def apply_lora(model: PreTrainedModel, *, rank: int, seed: int, attn: bool = True, mlp: bool = True,
               unembed: bool = True) -> PeftModel:  # fmt: skip
    """`model` with a fresh adapter (initialised from `seed`), its trained parameters fp32 over the frozen base."""
    config = LoraConfig(r=rank, lora_alpha=LORA_ALPHA, lora_dropout=0.0, task_type="CAUSAL_LM",
                        target_modules=target_modules(model, attn=attn, mlp=mlp, unembed=unembed))  # fmt: skip
    torch.manual_seed(seed)
    peft_model: PeftModel = get_peft_model(model, config)
    upcast_trainable(peft_model)
    base = peft_model.get_base_model()
    cast_embedding_output(base, autocast_dtype(base))
    return peft_model
