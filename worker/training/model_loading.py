"""The base model and tokenizer on the right device and dtype, and the LoRA adapter on top of them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from shared import events
from shared.config import EngineName, TrainConfig
from shared.events import EventPayload
from worker.training.attention import engine_attn_implementation, packing_unsupported
from worker.training.forward_backward import autocast_dtype, cast_embedding_output

EventCallback = Callable[[EventPayload, str], None]  # (typed payload, message): shared.events


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    """The frozen base's dtype: the config's, else bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU.

    ``train_arg_bf16=False`` alone means "not bf16": fp32, since fp16 runs without a loss scaler
    here; fp16 is used only when asked for (``train_arg_fp16=True``) or on GPUs without bf16.
    """
    named = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if config.model_load_torch_dtype != "auto":
        return named[config.model_load_torch_dtype]
    if config.train_arg_bf16:
        return torch.bfloat16
    if config.train_arg_fp16:
        return torch.float16
    if device.type != "cuda" or config.train_arg_bf16 is False:
        return torch.float32
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16 if config.train_arg_fp16 is not False else torch.float32


@dataclass(frozen=True)
class LoadPlan:
    """Everything that shapes a loaded base: two jobs with equal plans can share one loaded model."""

    model_name: str
    dtype: torch.dtype
    attn_implementation: str
    device: torch.device
    engine: EngineName  # not part of the load itself, but decided from the model's config with it


def plan_load(config: TrainConfig, device: torch.device, on_event: EventCallback | None = None) -> LoadPlan:
    """How `config`'s base will be loaded here: the attention implementation the hardware allows, and the
    engine that will train it (the config's, unless packing is not verified for this model)."""
    try:
        model_config = AutoConfig.from_pretrained(config.model_name)
    except OSError as exc:  # not a local directory and not in the hub cache (or the hub is unreachable)
        raise OSError(f"could not load model {config.model_name!r}: {exc}") from exc
    engine: EngineName = config.engine
    reason = packing_unsupported(model_config) if engine == "fast" else None
    if reason is not None:
        engine = "reference"
        if on_event is not None:
            on_event(events.warning(engine=engine), f"{reason}: training with the reference engine")
    attn, warning = engine_attn_implementation(engine, config.attn_implementation, device)
    if warning and on_event is not None:
        on_event(events.warning(requested=config.attn_implementation, using=attn), warning)
    return LoadPlan(config.model_name, resolve_dtype(config, device), attn, device, engine)


def load_planned(plan: LoadPlan) -> tuple[PreTrainedModel, Any]:
    """The base model and tokenizer as `plan` says, on its device."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(plan.model_name)
        model = AutoModelForCausalLM.from_pretrained(
            plan.model_name, dtype=plan.dtype, attn_implementation=plan.attn_implementation
        )
    except OSError as exc:
        raise OSError(f"could not load model {plan.model_name!r}: {exc}") from exc
    model.to(plan.device)  # type: ignore[arg-type]  # transformers types .to() for models oddly
    return model, tokenizer


def load_base_model(
    config: TrainConfig, device: torch.device, on_event: EventCallback | None = None
) -> tuple[PreTrainedModel, Any, EngineName]:
    """The base model and tokenizer, with the attention implementation the hardware allows, and the
    engine that will train it (the config's, unless packing is not verified for this model)."""
    plan = plan_load(config, device, on_event)
    model, tokenizer = load_planned(plan)
    return model, tokenizer, plan.engine


def check_modules_to_save(model: torch.nn.Module, names: Sequence[str]) -> None:
    """A name in lora_modules_to_save that matches no module is an error, not a silent no-op."""
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [n for n in names if n not in leaves and not any(m.endswith(n) for m, _ in model.named_modules())]
    if missing:
        raise ValueError(
            f"lora_modules_to_save: no module named {', '.join(map(repr, missing))} in {type(model).__name__}"
        )


def apply_lora(model: PreTrainedModel, config: TrainConfig, lora_path: Path | None) -> PeftModel:
    check_modules_to_save(model, config.lora_modules_to_save)
    if lora_path is not None:
        return PeftModel.from_pretrained(model, str(lora_path), is_trainable=True)
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules,
        modules_to_save=list(config.lora_modules_to_save) or None,
        # Tied input/output embeddings must stay tied when both are trained in full, or the saved adapter
        # (and a merged model, which reloads them tied) would disagree with what was trained.
        ensure_weight_tying=bool(getattr(model.config, "tie_word_embeddings", False)),
        task_type="CAUSAL_LM",
    )
    peft_model: PeftModel = get_peft_model(model, lora)
    return peft_model


def upcast_trainable(model: torch.nn.Module) -> None:
    """Keep every trained parameter in fp32 (the frozen base may be bf16/fp16).

    PEFT keeps LoRA weights in fp32 but copies `modules_to_save` (the seed's lm_head and
    embed_tokens) in the base dtype; AdamW on bf16 weights loses small updates, on fp16 it overflows.
    """
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()


def prepare_model(model: PreTrainedModel, config: TrainConfig, lora_path: Path | None = None) -> PeftModel:
    """What every job does to a loaded base: LoRA as configured, fp32 trained parameters, and the
    decoder kept in the compute dtype (the embedding's output cast; see `worker.training.forward_backward`)."""
    peft_model = apply_lora(model, config, lora_path)
    upcast_trainable(peft_model)
    base = peft_model.get_base_model()
    cast_embedding_output(base, autocast_dtype(base))
    return peft_model
