"""The fast engine computes what the reference computes; the loop trains; the TRL baseline runs.

Tolerances (fp32 on CPU, LoRA dropout 0): step loss equal to 1e-5 relative; every trainable
parameter's gradient `allclose(rtol=1e-4, atol=1e-6)` to the reference's (observed differences
are ~1e-7 against gradients of ~1e-1).
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from worker.engine import (
    PACKED_ATTENTION,
    EngineKind,
    StepOutput,
    chunked_lm_loss_sum,
    engine_attn_implementation,
    make_step_fn,
    pack_examples,
    pick_attn_implementation,
)
from worker.example import IGNORE_INDEX, Example
from worker.loop import StepInfo, train_loop

CPU = torch.device("cpu")
VOCAB = 256
LOSS_RTOL = 1e-5
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6


def tiny_lora_model(attn_implementation: str, *, modules_to_save: list[str] | None = None, dropout: float = 0.0) -> Any:
    """A 2-layer random Qwen2 (GQA, tied embeddings) with LoRA on all linears; lora_B non-zero."""
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM._from_config(config, attn_implementation=attn_implementation)
    lora = LoraConfig(
        r=8, lora_alpha=32, lora_dropout=dropout, target_modules="all-linear", modules_to_save=modules_to_save
    )
    peft_model = get_peft_model(model, lora)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero, which would leave A's gradient zero
                param.normal_(0.0, 0.1, generator=generator)
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


def run_step(
    model: nn.Module, kind: EngineKind, examples: list[Example], **options: Any
) -> tuple[StepOutput, dict[str, torch.Tensor]]:
    out = make_step_fn(model, kind=kind, device=CPU, **options)(examples)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(grads) == sum(p.requires_grad for p in model.parameters())
    return out, grads


def assert_same(
    out: StepOutput, grads: dict[str, torch.Tensor], ref_out: StepOutput, ref_grads: dict[str, torch.Tensor]
) -> None:
    assert (out.num_tokens, out.num_loss_tokens) == (ref_out.num_tokens, ref_out.num_loss_tokens)
    assert out.loss.item() == pytest.approx(ref_out.loss.item(), rel=LOSS_RTOL)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=name)


VARIED = [5, 31, 12, 2, 20]  # one step of sequences of very different lengths


@pytest.mark.parametrize("modules_to_save", [None, ["lm_head", "embed_tokens"]])
@pytest.mark.parametrize("fast_attention", [PACKED_ATTENTION, "sdpa"])
def test_fast_step_matches_reference_loss_and_gradients(modules_to_save: list[str] | None, fast_attention: str) -> None:
    engine_attn_implementation("fast", "sdpa", CPU)  # registers PACKED_ATTENTION
    examples = make_examples(VARIED)
    ref_out, ref_grads = run_step(tiny_lora_model("sdpa", modules_to_save=modules_to_save), "reference", examples)
    out, grads = run_step(tiny_lora_model(fast_attention, modules_to_save=modules_to_save), "fast", examples)
    assert ref_out.num_tokens == sum(VARIED)
    assert len(grads) == (28 if modules_to_save is None else 30)  # 2 layers x 7 linears x (A, B) + copies
    assert all(g.abs().max() > 0 for g in grads.values())
    assert_same(out, grads, ref_out, ref_grads)


def test_packed_loss_is_token_weighted_mean_of_sequences_alone() -> None:
    """Packing keeps sequences apart: each one alone gives the same per-token losses."""
    engine_attn_implementation("fast", "sdpa", CPU)
    examples = make_examples([7, 19, 3, 11])
    model = tiny_lora_model(PACKED_ATTENTION)
    packed = make_step_fn(model, kind="fast", device=CPU)(examples)
    singles = [make_step_fn(model, kind="reference", device=CPU)([e]) for e in examples]
    expected = sum(s.loss.item() * s.num_loss_tokens for s in singles) / sum(s.num_loss_tokens for s in singles)
    assert packed.loss.item() == pytest.approx(expected, rel=LOSS_RTOL)


def test_bucket_padding_and_small_loss_chunks_change_nothing() -> None:
    engine_attn_implementation("fast", "sdpa", CPU)
    examples = make_examples(VARIED)
    ref = run_step(tiny_lora_model(PACKED_ATTENTION), "fast", examples)
    padded = run_step(tiny_lora_model(PACKED_ATTENTION), "fast", examples, pad_to_multiple=16, loss_chunk_rows=7)
    assert_same(*padded, *ref)


def test_pack_examples_layout() -> None:
    a = Example([10, 11, 12], [IGNORE_INDEX, 11, 12])
    b = Example([20, 21], [20, 21])  # label at position 0 has no context: never a target
    packed = pack_examples([a, b], pad_to_multiple=4)
    assert packed.input_ids[:5] == [10, 11, 12, 20, 21] and len(packed.input_ids) == 8
    assert packed.position_ids == [0, 1, 2, 0, 1, 0, 1, 2]
    assert packed.seq_lens == (3, 2, 3)
    assert packed.loss_rows[:3] == [0, 1, 3] and packed.targets[:3] == [11, 12, 21]
    assert packed.targets[3] == IGNORE_INDEX and len(packed.targets) == 4
    assert (packed.num_tokens, packed.num_loss_tokens) == (5, 3)


def test_chunked_loss_matches_full_logits() -> None:
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=False)
    hidden = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    targets[::5] = IGNORE_INDEX
    full = nn.functional.cross_entropy(head(hidden), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    (full_grad,) = torch.autograd.grad(full, hidden)
    chunked = chunked_lm_loss_sum(head, hidden, targets, chunk_rows=4)
    (chunked_grad,) = torch.autograd.grad(chunked, hidden)
    torch.testing.assert_close(chunked, full)
    torch.testing.assert_close(chunked_grad, full_grad)


def test_step_without_loss_tokens_gives_zero_loss_and_gradients() -> None:
    engine_attn_implementation("fast", "sdpa", CPU)
    examples = [Example([5, 6, 7], [IGNORE_INDEX] * 3)]
    kinds: tuple[EngineKind, ...] = ("fast", "reference")
    for kind in kinds:
        model = tiny_lora_model(PACKED_ATTENTION)
        out, grads = run_step(model, kind, examples)
        assert out.loss.item() == 0.0 and out.num_loss_tokens == 0
        assert all(g.abs().max() == 0 for g in grads.values())


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


# --------------------------------------------------------------------------- the loop


def easy_dataset() -> list[Example]:
    return make_examples([12, 9, 15, 10], seed=3) * 4


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_train_loop_converges(engine: EngineKind) -> None:
    engine_attn_implementation("fast", "sdpa", CPU)
    model = tiny_lora_model(PACKED_ATTENTION, modules_to_save=["lm_head"])
    result = train_loop(model, easy_dataset(), epochs=8, batch_size=4, learning_rate=1e-2, device=CPU, engine=engine)
    first, last = result.logged_losses[0][1], result.final_loss
    assert result.steps_done == 32 and not result.stopped
    assert last is not None and last < 0.5 * first, (first, last)


def test_both_engines_follow_the_same_trajectory() -> None:
    engine_attn_implementation("fast", "sdpa", CPU)
    finals = []
    engines: tuple[EngineKind, ...] = ("fast", "reference")
    for engine in engines:
        result = train_loop(
            tiny_lora_model(PACKED_ATTENTION),
            easy_dataset(),
            epochs=3,
            batch_size=4,
            learning_rate=5e-3,
            device=CPU,
            engine=engine,
        )
        finals.append(result.final_loss)
    assert finals[0] == pytest.approx(finals[1], rel=1e-3)


def test_train_loop_reports_steps_and_epochs() -> None:
    engine_attn_implementation("fast", "sdpa", CPU)
    examples = make_examples([6, 8, 10, 7, 9])  # 5 examples, batch 2: 3 steps per epoch, last holds 1
    steps: list[StepInfo] = []
    epochs: list[tuple[int, float | None]] = []
    result = train_loop(
        tiny_lora_model(PACKED_ATTENTION, dropout=0.05),
        examples,
        epochs=2,
        batch_size=2,
        learning_rate=1e-3,
        device=CPU,
        log_every=2,
        on_step=steps.append,
        on_epoch_end=lambda e, loss: epochs.append((e, loss)),
    )
    assert [s.step for s in steps] == [1, 2, 3, 4, 5, 6]
    assert all(s.total_steps == 6 and s.epochs == 2 for s in steps)
    assert [s.epoch for s in steps] == [1, 1, 1, 2, 2, 2]
    assert [s.loss is not None for s in steps] == [False, True, False, True, False, True]
    assert [s.grad_norm is not None for s in steps] == [False, True, False, True, False, True]
    assert steps[0].learning_rate == pytest.approx(1e-3)
    assert all(a.learning_rate > b.learning_rate > 0 for a, b in itertools.pairwise(steps))
    assert all(s.tokens_per_second > 0 and s.eta_seconds >= 0 for s in steps)
    assert steps[-1].eta_seconds == 0
    assert sum(s.num_tokens for s in steps[:3]) == sum(s.num_tokens for s in steps[3:]) == 40
    assert sum(s.num_tokens for s in steps) == result.total_tokens == 80
    assert [e for e, _ in epochs] == [1, 2] and all(isinstance(loss, float) for _, loss in epochs)
    assert result.logged_losses == [(s.step, s.loss) for s in steps if s.loss is not None]
    assert result.final_loss == steps[-1].loss and result.elapsed_s > 0


def test_should_stop_ends_the_loop() -> None:
    engine_attn_implementation("fast", "sdpa", CPU)
    seen: list[int] = []
    result = train_loop(
        tiny_lora_model(PACKED_ATTENTION),
        easy_dataset(),
        epochs=5,
        batch_size=4,
        learning_rate=1e-3,
        device=CPU,
        on_step=lambda info: seen.append(info.step),
        should_stop=lambda: len(seen) >= 3,
    )
    assert result.stopped and result.steps_done == 3 and seen == [1, 2, 3]
    assert result.final_loss is not None


def test_should_stop_before_the_first_step() -> None:
    result = train_loop(
        tiny_lora_model("sdpa"),
        easy_dataset(),
        epochs=1,
        batch_size=4,
        learning_rate=1e-3,
        device=CPU,
        engine="reference",
        should_stop=lambda: True,
    )
    assert result.stopped and result.steps_done == 0 and result.final_loss is None


# --------------------------------------------------------------------------- TRL baseline


def test_trl_baseline_runs_a_few_steps_on_cpu(tiny_model_dir: Path) -> None:
    from peft import get_peft_model as wrap
    from transformers import AutoTokenizer

    from worker.trl_baseline import run_trl_baseline

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    model = wrap(base, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"))
    examples = make_examples([12, 30, 7, 21, 16, 9], seed=5)
    result = run_trl_baseline(
        model,
        tokenizer,
        examples,
        epochs=1,
        batch_size=2,
        learning_rate=1e-3,
        seed=0,
        warmup_steps=1,
        shuffle=False,
    )
    assert result["steps"] == 2
    assert result["tokens"] == 7 + 21 + 16 + 9
    assert result["tokens_per_second"] > 0 and result["peak_memory_bytes"] > 0
    assert result["final_loss"] is not None and result["final_loss"] > 0


def test_bf16_autocast_path_matches_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA precision setup (bf16 base, fp32 adapters, bf16 autocast), exercised on CPU."""
    import worker.engine

    monkeypatch.setattr(worker.engine, "autocast_dtype", lambda model, device: torch.bfloat16)
    engine_attn_implementation("fast", "sdpa", CPU)
    examples = make_examples(VARIED)
    results = []
    for kind, attention in (("reference", "sdpa"), ("fast", PACKED_ATTENTION)):
        model = tiny_lora_model(attention)
        model.get_base_model().to(torch.bfloat16)
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.float()
        results.append(run_step(model, kind, examples))  # type: ignore[arg-type]
    (ref_out, ref_grads), (out, grads) = results
    assert out.loss.item() == pytest.approx(ref_out.loss.item(), rel=1e-3)
    for name, grad in grads.items():
        assert grad.dtype == torch.float32
        scale = ref_grads[name].abs().max()
        assert (grad - ref_grads[name]).abs().max() <= 0.05 * scale, name


_FAKE_VARLEN_CALLS: list[int] = []


def _fake_varlen_attn(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor,
    max_q: int,
    max_k: int,
    *,
    window_size: tuple[int, int] = (-1, -1),
    scale: float | None = None,
) -> torch.Tensor:
    """CPU stand-in with torch 2.11's `varlen_attn` signature (no enable_gqa): (T, H, D) in and out."""
    _FAKE_VARLEN_CALLS.append(max_q)
    assert cu_seq_q.dtype == torch.int32 and window_size == (-1, 0)
    assert key.shape[1] == query.shape[1], "GQA must be expanded when the kernel lacks enable_gqa"
    bounds = cu_seq_q.tolist()
    assert max_q >= max(b - a for a, b in itertools.pairwise(bounds))
    outputs = []
    for start, end in itertools.pairwise(bounds):
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))
        out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        outputs.append(out.transpose(0, 1))
    return torch.cat(outputs)


def test_varlen_kernel_plumbing_matches_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """What runs on CUDA (PyTorch's varlen kernel), with a CPU stand-in for the kernel."""
    import inspect

    import worker.engine

    fake = worker.engine._Varlen(_fake_varlen_attn, frozenset(inspect.signature(_fake_varlen_attn).parameters))
    monkeypatch.setattr(worker.engine, "_torch_varlen", lambda device, dtype: fake)
    engine_attn_implementation("fast", "sdpa", CPU)
    examples = make_examples(VARIED)
    ref = run_step(tiny_lora_model("sdpa"), "reference", examples)
    model = tiny_lora_model(PACKED_ATTENTION)
    step = make_step_fn(model, kind="fast", device=CPU)
    assert getattr(step, "varlen", None) is fake
    _FAKE_VARLEN_CALLS.clear()
    out = step(examples)
    assert len(_FAKE_VARLEN_CALLS) == 2 and set(_FAKE_VARLEN_CALLS) == {max(VARIED)}  # once per layer
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    assert_same(out, grads, *ref)
