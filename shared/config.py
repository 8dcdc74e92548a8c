"""The training configuration: the seed's fields, types and defaults, validated strictly."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

AttnImplementation = Literal["flash_attention_2", "flash_attention_3", "sdpa", "eager", "flex_attention"]
TorchDtypeName = Literal["auto", "bfloat16", "float16", "float32"]
EngineName = Literal["fast", "reference"]
TrainingMethod = Literal["sft", "dpo"]

# The seed documented `embed_token`; the module in Qwen2/Llama-style models is `embed_tokens`.
_MODULE_ALIASES = {"embed_token": "embed_tokens"}


class TrainConfig(BaseModel):
    """One fine-tuning job's configuration. Unknown fields and wrong types are refused.

    As in the seed, it can be built and then changed field by field (``cfg.epochs = 10``); every
    assignment is validated. Numbers may come as ``3``, ``3.0`` or ``"3"``; booleans, NaN and
    infinities are not numbers here.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    model_name: str = Field(
        default="Qwen/Qwen2.5-0.5B",
        min_length=1,
        description="Hub id (org/name), a model folder under base_path (by its name there), or one in a models "
        "directory (LORA_MODELS_DIR); the service refuses anything else at submission (api.base_models).",
    )
    lora_path: str | None = Field(default=None, description="Existing adapter to continue (inside base_path).")
    lora_rank: int = Field(default=8, ge=1, le=1024, description="LoRA rank r.")
    lora_alpha: int = Field(default=32, ge=1, description="LoRA scaling alpha.")
    lora_dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA path.")
    epochs: int = Field(default=3, ge=1, le=10_000, description="Passes over the dataset.")
    batch_size: int = Field(default=4, ge=1, le=4096, description="Sequences per optimizer step.")
    learning_rate: float = Field(default=3e-4, gt=0.0, le=1.0, description="Peak learning rate (linear decay).")
    max_length: int | None = Field(default=None, ge=8, description="Truncate sequences to this many tokens.")
    model_save_path: str | None = Field(default=None, description="Output folder under base_path (default: job id).")
    response_template: str | None = Field(
        default="<|im_start|>assistant\n",
        min_length=1,
        description="Fallback marker of assistant turns (null: derived from the chat template).",
    )
    lora_target_modules: list[str] | str = Field(default="all-linear", description="'all-linear' or module names.")
    lora_modules_to_save: list[str] = Field(
        default_factory=lambda: ["lm_head", "embed_tokens"],
        description="Modules trained in full (null or []: none).",
    )
    tokenizer_padding_side: Literal["left", "right"] | None = Field(
        default="left", description="Saved tokenizer's side."
    )
    attn_implementation: AttnImplementation = Field(
        default="flash_attention_2",
        description="Falls back to sdpa where flash-attn or CUDA is missing.",
    )
    model_load_torch_dtype: TorchDtypeName = Field(
        default="auto",
        description="'auto': bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU.",
    )
    train_arg_bf16: bool | None = Field(default=None, description="Force bf16 autocast on/off (None: from hardware).")
    train_arg_fp16: bool | None = Field(default=None, description="Force fp16 autocast on/off (None: from hardware).")
    seed: int = Field(default=42, ge=0, le=2**32 - 1, description="Seed for LoRA init and data order.")
    engine: EngineName = Field(default="fast", description="'fast' (packed, chunked loss) or 'reference'.")
    compile: bool | None = Field(
        default=None,
        description="Fast engine: static bucketed shapes, compiled decoder layers and whole-step CUDA graphs "
        "(None: on CUDA each where it pays for this job, off on CPU; True: both; False: neither).",
    )
    log_every: int | None = Field(
        default=None, ge=1, description="Read loss back every N steps (None: every step on CPU, every 10 on a GPU)."
    )
    validation_split: float | None = Field(
        default=None, gt=0.0, lt=0.5, description="Hold out this fraction of records; eval loss per epoch."
    )
    method: TrainingMethod = Field(
        default="sft",
        description="'sft': supervised, on chat records; 'dpo': Direct Preference Optimization on preference pairs "
        "(shared.preference), the base with the adapter disabled as the reference model.",
    )
    dpo_beta: float = Field(
        default=0.1, gt=0.0, le=100.0, description="DPO's beta: how far the policy may move from the reference."
    )
    keep_checkpoints: int = Field(default=2, ge=0, le=100, description="Adapter checkpoints kept (one per epoch).")

    train_round: int = Field(default=0, ge=0, description="The seed's run counter; names the W&B run.")

    @field_validator(
        "lora_rank", "lora_alpha", "lora_dropout", "epochs", "batch_size", "learning_rate", "max_length", "seed",
        "log_every", "validation_split", "keep_checkpoints", "train_round", "dpo_beta", mode="before",
    )  # fmt: skip
    @classmethod
    def _no_booleans_as_numbers(cls, value: object) -> object:
        if isinstance(value, bool):  # lax validation would take True for 1
            raise ValueError("expected a number, not a boolean")
        return value

    @field_validator("lora_modules_to_save", mode="before")
    @classmethod
    def _none_means_no_module(cls, value: object) -> object:
        return [] if value is None else value

    @field_validator("lora_modules_to_save")
    @classmethod
    def _alias_modules(cls, names: list[str]) -> list[str]:
        out: list[str] = []
        for name in names:
            if not name.strip():
                raise ValueError("module names must be non-empty")
            mapped = _MODULE_ALIASES.get(name, name)
            if mapped not in out:
                out.append(mapped)
        return out

    @field_validator("lora_target_modules")
    @classmethod
    def _check_targets(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, str):
            if not value.strip():
                raise ValueError("must be 'all-linear' or a non-empty list of module names")
            return value
        if not value or any(not v.strip() for v in value):
            raise ValueError("must be 'all-linear' or a non-empty list of module names")
        return value

    @field_validator("model_save_path", "lora_path")
    @classmethod
    def _non_empty_path(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or "\x00" in value):
            raise ValueError("must be a non-empty path without NUL characters")
        return value

    @model_validator(mode="after")
    def _one_half_precision(self) -> TrainConfig:
        if self.train_arg_bf16 and self.train_arg_fp16:
            raise ValueError("train_arg_bf16 and train_arg_fp16 cannot both be true")
        return self

    @model_validator(mode="after")
    def _dpo_from_the_base(self) -> TrainConfig:
        # DPO's reference is the base with the adapter switched off: continuing an adapter (SFT, then
        # DPO) would make the raw base the reference instead of the model being continued.
        if self.method == "dpo" and self.lora_path is not None:
            raise ValueError("method 'dpo' cannot continue an adapter (lora_path): its reference model is the base")
        return self
