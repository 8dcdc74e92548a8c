"""A Tinker training client's adapter: LoRA of the client's rank on the parts its `LoraConfig` names.

The SDK's `LoraConfig` trains the attention and MLP projections and the unembedding (the LM head) by
default, each switchable. The adapter has no dropout: a client's `forward` must return the same
log-probabilities its `forward_backward` trains on (importance ratios are computed from them).

Several clients on one base share it: each client's adapter is a named PEFT adapter on the same model
(`add_client_adapter`), made active for that client's calls and removed when the client leaves.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import PreTrainedModel

from worker.training.forward_backward import autocast_dtype, cast_embedding_output

LORA_ALPHA = 32  # fixed, whatever the rank (as Tinker does): the learning rate, not alpha, is what clients tune
_ATTENTION_PARTS = (".self_attn.", ".attention.", ".attn.")
_MLP_PARTS = (".mlp.", ".feed_forward.", ".ffn.")


def target_modules(model: Any, *, attn: bool, mlp: bool, unembed: bool) -> list[str]:
    """The linear layers to adapt, by full name: the decoder's attention and MLP ones, and the LM head. On a base
    that carries other clients' adapters already, a wrapped layer counts by its own name (not its `base_layer`'s)
    and the adapters' own layers are not candidates."""
    head = model.get_output_embeddings()
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        parts = name.split(".")
        if any(p.startswith("lora_") or p in ("modules_to_save", "original_module") for p in parts):
            continue
        owner = module
        if parts[-1] == "base_layer":
            name = ".".join(parts[:-1])
            owner = model.get_submodule(name)
        dotted = f".{name}."
        wanted = (
            (attn and any(p in dotted for p in _ATTENTION_PARTS))
            or (mlp and any(p in dotted for p in _MLP_PARTS))
            or (unembed and owner is head)
        )
        if wanted:
            names.append(name)
    if not names:
        raise ValueError("the LoRA config trains nothing in this model (train_attn, train_mlp and train_unembed)")
    return names


def apply_lora(model: PreTrainedModel, *, rank: int, seed: int, attn: bool = True, mlp: bool = True,
               unembed: bool = True) -> PeftModel:  # fmt: skip
    """`model` with a fresh adapter (initialised from `seed`), its trained parameters fp32 over the frozen base."""
    return add_client_adapter(model, "default", rank=rank, seed=seed, attn=attn, mlp=mlp, unembed=unembed)


def add_client_adapter(model: PreTrainedModel | PeftModel, name: str, *, rank: int, seed: int, attn: bool = True,
                       mlp: bool = True, unembed: bool = True) -> PeftModel:  # fmt: skip
    """A fresh adapter `name` (initialised from `seed`) on `model`: a plain base becomes a PeftModel, a PeftModel
    gets one more adapter beside the others. Its parameters are fp32 over the frozen base."""
    base: Any = model.get_base_model() if isinstance(model, PeftModel) else model
    config = LoraConfig(r=rank, lora_alpha=LORA_ALPHA, lora_dropout=0.0, task_type="CAUSAL_LM",
                        target_modules=target_modules(base, attn=attn, mlp=mlp, unembed=unembed))  # fmt: skip
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        # LoRA on a head tied to the input embedding adapts the head's output only, which is what the client
        # trains (the embedding stays frozen); PEFT warns about the tie whatever the intent.
        warnings.filterwarnings("ignore", message=r"Model has `tie_word_embeddings=True`")
        if isinstance(model, PeftModel):
            model.add_adapter(name, config)
            peft_model = model
        else:
            peft_model = get_peft_model(model, config, adapter_name=name)
            cast_embedding_output(base, autocast_dtype(base))
    for param_name, param in peft_model.named_parameters():
        if f".{name}." in param_name and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
    return peft_model


def adapter_parameters(model: PeftModel, name: str) -> list[nn.Parameter]:
    """Adapter `name`'s own parameters (what its client's optimizer steps)."""
    return [param for param_name, param in model.named_parameters() if f".{name}." in param_name]
