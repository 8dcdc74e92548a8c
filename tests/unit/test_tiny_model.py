"""worker.tiny_model: a loadable, deterministic tiny Qwen2 chat model built offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerFast,
)

from worker.tiny_model import build_tiny_model, main

MESSAGES = [
    {"role": "system", "content": "sys"},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
]


def test_loads_with_auto_classes_and_runs_a_forward_pass(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    batch = tokenizer(ids, add_special_tokens=False, return_tensors="pt")
    out = model(**batch, labels=batch["input_ids"])
    assert out.logits.shape == (1, batch["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(out.loss)


def test_greedy_generation_runs(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompt = tokenizer.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    batch = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > batch["input_ids"].shape[1]


def test_config_matches_the_tokenizer(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = AutoConfig.from_pretrained(tiny_model_dir)
    generation = GenerationConfig.from_pretrained(tiny_model_dir)
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert config.model_type == "qwen2"
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (2, 64, 128)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.tie_word_embeddings is True
    assert config.max_position_embeddings == 2048
    assert config.vocab_size == len(tokenizer)
    assert (config.eos_token_id, config.pad_token_id) == (eos_id, pad_id)
    assert config.bos_token_id == pad_id  # as in Qwen2: <|endoftext|>, never prepended
    assert (generation.eos_token_id, generation.pad_token_id) == (eos_id, pad_id)
    assert generation.bos_token_id == pad_id


def test_tokenizer_has_chatml_specials_and_a_small_vocab(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer.is_fast
    assert 400 <= len(tokenizer) <= 600
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1
    text = "Hello, wörld! 12 + 30 = 42\n\ttabs  and  spaces 🙂"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer(text)["input_ids"] == ids  # nothing added around the text
    assert tokenizer.decode(ids) == text


def test_chat_template_is_chatml_without_default_system(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    user = [{"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(user, tokenize=False) == "<|im_start|>user\nHi<|im_end|>\n"
    assert tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.apply_chat_template(MESSAGES, tokenize=False) == (
        "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
    )


def test_auto_tokenizer_encodes_like_the_saved_tokenizer(tiny_model_dir: Path) -> None:
    # AutoTokenizer rebuilds a Qwen2Tokenizer from vocab + merges; it must match tokenizer.json.
    auto = AutoTokenizer.from_pretrained(tiny_model_dir)
    plain = PreTrainedTokenizerFast(tokenizer_file=str(tiny_model_dir / "tokenizer.json"))
    text = str(auto.apply_chat_template(MESSAGES, tokenize=False)) + "Don't   stop 2026 café\r\n"
    assert auto(text)["input_ids"] == plain(text)["input_ids"]


def test_build_is_deterministic_per_seed(tmp_path: Path) -> None:
    a = build_tiny_model(tmp_path / "a", seed=3)
    b = build_tiny_model(tmp_path / "b", seed=3)
    c = build_tiny_model(tmp_path / "c", seed=4)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


def test_build_leaves_the_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(tmp_path / "m")
    assert torch.equal(torch.rand(3), expected)


def test_vocab_corpus_shapes_the_vocabulary(tmp_path: Path) -> None:
    word = "zqxjkwvb"
    default = AutoTokenizer.from_pretrained(build_tiny_model(tmp_path / "default"))
    tuned = AutoTokenizer.from_pretrained(
        build_tiny_model(tmp_path / "tuned", vocab_corpus=[f"{word} {word} {word}"] * 50)
    )
    assert len(tuned(word)["input_ids"]) < len(default(word)["input_ids"])


def test_cli_writes_a_loadable_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main([str(tmp_path / "cli"), "--seed", "1"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "cli").config.vocab_size > 0
