"""Tinker's token-level sampler on the tiny model: greedy equals transformers' `generate`, every reported
log-probability equals a plain forward's, seeds reproduce, each stop ends where it should, and an adapter
folder is sampled through the worker's model cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shared.tinker_ops import SampleOp, SampleResult
from worker.generation.model_cache import ModelCache, inference
from worker.generation.token_sampling import SampleInputError, eos_token_ids, sample

TEXT = "The quick brown fox jumps over the lazy dog. What is two plus two?"
TOL = 1e-4


@pytest.fixture(scope="module")
def cache(tiny_model_dir: Path) -> ModelCache:
    return ModelCache(max_bases=1, max_adapters=4, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def plain(tiny_model_dir: Path) -> Any:
    """The base model as loaded by transformers alone (the reference the sampler is checked against)."""
    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt(tiny_model_dir: Path) -> list[int]:
    ids: list[int] = AutoTokenizer.from_pretrained(str(tiny_model_dir))(TEXT)["input_ids"]
    assert len(ids) > 5
    return ids


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A LoRA adapter made with PEFT on the tiny model, with random (non-identity) weights, saved to a folder."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.mul_(5.0)  # far enough from the base that its samples differ
    out = tmp_path_factory.mktemp("adapter") / "a"
    peft_model.save_pretrained(str(out))
    return str(out)


def _op(model_dir: Path, prompt: list[int], **params: Any) -> SampleOp:
    return SampleOp(request_id="r", model_dir=str(model_dir), prompt=prompt, **params)


def _sample(cache: ModelCache, op: SampleOp) -> SampleResult:
    base, adapter = cache.get(op.model_dir, op.adapter_dir)
    with inference(), base.use(adapter):
        return sample(base.model, base.tokenizer, op, cache_arg=base.cache_arg)


def _forward_logprobs(model: Any, tokens: list[int]) -> torch.Tensor:
    """log_softmax of a plain (no cache) forward over `tokens`: row i scores the token after position i."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def _assert_logprobs_match(model: Any, prompt: list[int], result: SampleResult) -> None:
    for seq in result.sequences:
        assert len(seq.logprobs) == len(seq.tokens)
        scores = _forward_logprobs(model, prompt + seq.tokens)
        expected = [float(scores[len(prompt) - 1 + i, token]) for i, token in enumerate(seq.tokens)]
        assert seq.logprobs == pytest.approx(expected, abs=TOL)


def test_temperature_zero_is_transformers_greedy_generate(
    cache: ModelCache, plain: Any, tiny_model_dir: Path, prompt: list[int]
) -> None:
    result = _sample(cache, _op(tiny_model_dir, prompt, temperature=0, max_tokens=24, num_samples=2))
    with torch.no_grad():
        expected = plain.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24)[0, len(prompt) :]
    assert [seq.tokens for seq in result.sequences] == [expected.tolist()] * 2
    again = _sample(cache, _op(tiny_model_dir, prompt, temperature=0, max_tokens=24, num_samples=2))
    assert again == result  # greedy is exactly deterministic, logprobs included
    alone = _sample(cache, _op(tiny_model_dir, prompt, temperature=0, max_tokens=24))
    assert alone.sequences[0].tokens == result.sequences[0].tokens  # a batch of one agrees (logprobs to rounding)
    _assert_logprobs_match(plain, prompt, result)


def test_sampled_logprobs_are_the_raw_models_whatever_the_temperature_and_truncation(
    cache: ModelCache, plain: Any, tiny_model_dir: Path, prompt: list[int]
) -> None:
    op = _op(tiny_model_dir, prompt, temperature=0.7, top_k=40, top_p=0.9, seed=5, max_tokens=12, num_samples=4,
             stop_at_eos=False)  # fmt: skip
    result = _sample(cache, op)
    assert len(result.sequences) == 4
    assert all(len(seq.tokens) == 12 and seq.stop_reason == "length" for seq in result.sequences)
    assert len({tuple(seq.tokens) for seq in result.sequences}) > 1  # the rows are drawn independently
    _assert_logprobs_match(plain, prompt, result)


def test_prompt_logprobs_are_a_plain_forwards_with_none_first(
    cache: ModelCache, plain: Any, tiny_model_dir: Path, prompt: list[int]
) -> None:
    result = _sample(cache, _op(tiny_model_dir, prompt, max_tokens=1, prompt_logprobs=True))
    scores = _forward_logprobs(plain, prompt)
    assert result.prompt_logprobs is not None and len(result.prompt_logprobs) == len(prompt)
    assert result.prompt_logprobs[0] is None
    expected = [float(scores[i - 1, prompt[i]]) for i in range(1, len(prompt))]
    assert result.prompt_logprobs[1:] == pytest.approx(expected, abs=TOL)
    assert _sample(cache, _op(tiny_model_dir, prompt, max_tokens=1)).prompt_logprobs is None


def test_a_seed_reproduces_the_samples_and_another_seed_draws_others(
    cache: ModelCache, tiny_model_dir: Path, prompt: list[int]
) -> None:
    def draw(seed: int | None) -> list[list[int]]:
        op = _op(tiny_model_dir, prompt, seed=seed, max_tokens=16, num_samples=3, stop_at_eos=False)
        return [seq.tokens for seq in _sample(cache, op).sequences]

    assert draw(11) == draw(11)
    assert draw(11) != draw(12)
    assert draw(None) != draw(None)


def test_top_k_one_is_greedy(cache: ModelCache, tiny_model_dir: Path, prompt: list[int]) -> None:
    greedy = _sample(cache, _op(tiny_model_dir, prompt, temperature=0, max_tokens=10, stop_at_eos=False))
    top1 = _sample(cache, _op(tiny_model_dir, prompt, top_k=1, seed=1, max_tokens=10, stop_at_eos=False))
    assert top1.sequences[0].tokens == greedy.sequences[0].tokens


def _first_new_at(tokens: list[int], start: int) -> int:
    """The first index from `start` whose token does not occur before it."""
    return next(i for i in range(start, len(tokens)) if tokens[i] not in tokens[:i])


def test_a_stop_token_ends_the_sequence_and_is_kept(cache: ModelCache, tiny_model_dir: Path, prompt: list[int]) -> None:
    params: dict[str, Any] = {"seed": 4, "max_tokens": 30, "stop_at_eos": False}
    full = _sample(cache, _op(tiny_model_dir, prompt, **params)).sequences[0]
    assert full.stop_reason == "length" and len(full.tokens) == 30
    i = _first_new_at(full.tokens, 3)
    cut = _sample(cache, _op(tiny_model_dir, prompt, stop_tokens=[full.tokens[i]], **params)).sequences[0]
    assert cut.stop_reason == "stop"
    assert cut.tokens == full.tokens[: i + 1]
    assert cut.logprobs == full.logprobs[: i + 1]


def test_a_stop_string_ends_with_the_token_that_completes_it(
    cache: ModelCache, tiny_model_dir: Path, prompt: list[int]
) -> None:
    tokenizer = cache.get(str(tiny_model_dir), None)[0].tokenizer
    params: dict[str, Any] = {"seed": 9, "max_tokens": 30, "stop_at_eos": False}
    full = _sample(cache, _op(tiny_model_dir, prompt, **params)).sequences[0]

    def decode(tokens: list[int]) -> str:
        return str(tokenizer.decode(tokens, skip_special_tokens=False))

    # A token from the fifth on whose text is whole and first appears when it is produced.
    i = next(
        i
        for i in range(4, len(full.tokens))
        if (piece := decode(full.tokens[i : i + 1])).strip()
        and "\ufffd" not in piece
        and piece not in decode(full.tokens[:i])
        and decode(full.tokens[: i + 1]).endswith(piece)
    )
    stop = decode(full.tokens[i : i + 1])
    cut = _sample(cache, _op(tiny_model_dir, prompt, stop_strings=["never produced \u2603", stop], **params))
    assert cut.sequences[0].stop_reason == "stop"
    assert cut.sequences[0].tokens == full.tokens[: i + 1]


def test_eos_stops_only_when_asked(cache: ModelCache, tiny_model_dir: Path, prompt: list[int]) -> None:
    base = cache.get(str(tiny_model_dir), None)[0]
    eos = eos_token_ids(base.tokenizer, base.model)
    assert eos  # the tiny model's <|im_end|>
    # Draw until a seed produces eos within the budget, then check that without stop_at_eos it goes on past it.
    for seed in range(200):
        stopped = _sample(cache, _op(tiny_model_dir, prompt, seed=seed, max_tokens=40, temperature=2.0)).sequences[0]
        if stopped.stop_reason == "stop":
            break
    else:
        pytest.fail("no seed produced eos in 40 tokens")
    assert stopped.tokens[-1] in eos and not set(stopped.tokens[:-1]) & eos
    on = _sample(cache, _op(tiny_model_dir, prompt, seed=seed, max_tokens=40, temperature=2.0, stop_at_eos=False))
    assert on.sequences[0].stop_reason == "length" and len(on.sequences[0].tokens) == 40
    assert on.sequences[0].tokens[: len(stopped.tokens)] == stopped.tokens


def test_max_tokens_ends_with_length(cache: ModelCache, tiny_model_dir: Path, prompt: list[int]) -> None:
    result = _sample(cache, _op(tiny_model_dir, prompt, seed=1, max_tokens=5, num_samples=3, stop_at_eos=False))
    assert [(len(s.tokens), s.stop_reason) for s in result.sequences] == [(5, "length")] * 3


def test_an_adapter_folder_changes_the_samples(
    cache: ModelCache, tiny_model_dir: Path, prompt: list[int], adapter_dir: str
) -> None:
    from peft import PeftModel

    params: dict[str, Any] = {"temperature": 0, "max_tokens": 16, "stop_at_eos": False, "prompt_logprobs": True}
    base = _sample(cache, _op(tiny_model_dir, prompt, **params))
    tuned = _sample(cache, _op(tiny_model_dir, prompt, adapter_dir=adapter_dir, **params))
    assert tuned.sequences[0].tokens != base.sequences[0].tokens
    assert tuned.prompt_logprobs != pytest.approx(base.prompt_logprobs, abs=1e-3)
    alone = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32), adapter_dir
    ).eval()
    _assert_logprobs_match(alone, prompt, tuned)
    # ... and the base, asked again on the same cache, is the base again (the adapter is off for it).
    assert _sample(cache, _op(tiny_model_dir, prompt, **params)) == base


def test_a_token_outside_the_vocabulary_is_refused_by_name(
    cache: ModelCache, tiny_model_dir: Path, prompt: list[int]
) -> None:
    with pytest.raises(SampleInputError, match=r"prompt token 999999 \(position 2\) is outside"):
        _sample(cache, _op(tiny_model_dir, [prompt[0], prompt[1], 999999]))
    with pytest.raises(SampleInputError, match="prompt token -1"):
        _sample(cache, _op(tiny_model_dir, [-1]))
    with pytest.raises(SampleInputError, match="empty"):
        _sample(cache, _op(tiny_model_dir, []))
