import pytest
from pydantic import ValidationError

from shared.config import TrainConfig


def test_defaults_match_the_seed_table() -> None:
    c = TrainConfig()
    assert c.model_name == "Qwen/Qwen2.5-0.5B"
    assert (c.lora_rank, c.lora_alpha, c.lora_dropout) == (8, 32, 0.05)
    assert (c.epochs, c.batch_size, c.learning_rate) == (3, 4, 3e-4)
    assert c.max_length is None and c.model_save_path is None and c.lora_path is None
    assert c.response_template == "<|im_start|>assistant\n"
    assert c.lora_target_modules == "all-linear"
    assert c.lora_modules_to_save == ["lm_head", "embed_tokens"]
    assert c.tokenizer_padding_side == "left"
    assert c.attn_implementation == "flash_attention_2"


def test_seed_embed_token_means_embed_tokens() -> None:
    assert TrainConfig(lora_modules_to_save=["lm_head", "embed_token"]).lora_modules_to_save == [
        "lm_head",
        "embed_tokens",
    ]


@pytest.mark.parametrize(
    ("field", "value"),
    [("epochs", "three"), ("epochs", True), ("epochs", 0), ("batch_size", 1.5), ("learning_rate", "fast"), ("lora_dropout", 1.0),
     ("attn_implementation", "magic"), ("lora_target_modules", []), ("tokenizer_padding_side", "middle")],
)  # fmt: skip
def test_wrong_values_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        TrainConfig.model_validate({field: value})
    assert info.value.errors()[0]["loc"][0] == field


def test_unknown_field_is_refused() -> None:
    with pytest.raises(ValidationError) as info:
        TrainConfig.model_validate({"epoch": 3})
    assert info.value.errors()[0]["loc"] == ("epoch",)


def test_bf16_and_fp16_together_are_refused() -> None:
    with pytest.raises(ValidationError):
        TrainConfig(train_arg_bf16=True, train_arg_fp16=True)


def test_dpo_cannot_continue_an_adapter() -> None:
    # Its reference is the base with the adapter off: on a continued adapter that would not be the model being tuned.
    with pytest.raises(ValidationError, match="cannot continue an adapter"):
        TrainConfig(method="dpo", lora_path="my_sft_adapter")
    assert TrainConfig(method="dpo").lora_path is None and TrainConfig(lora_path="x").method == "sft"
