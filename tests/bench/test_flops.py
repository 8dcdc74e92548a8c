"""The benchmark counts the FLOPs each engine really computes: the LM head on loss positions only for the fast one."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from bench.train import SHAPES, Shape, StepWork, step_flops, step_work
from worker.training.packing import bucket_size

SHAPE = Shape(hidden=8, layers=2, heads=2, kv_heads=1, mlp=16, vocab=100)
LENGTHS = [10, 30, 20]
LOSS_TOKENS = 25


def test_fast_engine_runs_the_head_on_loss_positions_only() -> None:
    fast = step_work(LENGTHS, LOSS_TOKENS, engine="fast")
    padded = step_work(LENGTHS, LOSS_TOKENS, engine="reference")
    assert fast == StepWork(positions=60, attention_pairs=55 + 465 + 210, head_rows=25)
    assert padded == StepWork(positions=90, attention_pairs=3 * 465, head_rows=90)
    assert step_work(LENGTHS, LOSS_TOKENS, engine="trl") == padded
    assert step_work(LENGTHS, LOSS_TOKENS, engine="useful") == fast


def test_head_flops_follow_the_rows_the_head_runs_on() -> None:
    def head_flops(work: StepWork, trained: bool) -> float:
        without_head = StepWork(work.positions, work.attention_pairs, 0)
        return step_flops(SHAPE, work, lora_rank=8, head_trained=trained) - step_flops(
            SHAPE, without_head, lora_rank=8, head_trained=trained
        )

    fast = step_work(LENGTHS, LOSS_TOKENS, engine="fast")
    padded = step_work(LENGTHS, LOSS_TOKENS, engine="reference")
    # Trained in full (modules_to_save): forward, input gradient, weight gradient; frozen: no weight gradient.
    assert head_flops(fast, trained=True) == 6 * 100 * 8 * 25
    assert head_flops(fast, trained=False) == 4 * 100 * 8 * 25
    assert head_flops(padded, trained=True) == 6 * 100 * 8 * 90


def test_flop_formula_terms() -> None:
    work = StepWork(positions=7, attention_pairs=11, head_rows=3)
    linears = [(8, 8), (8, 4), (8, 4), (8, 8), (8, 16), (8, 16), (16, 8)]  # q, k, v, o, gate, up, down
    decoder = 2 * sum(i * o for i, o in linears)
    lora = 2 * sum(4 * (i + o) for i, o in linears)
    expected = 4 * decoder * 7 + 6 * lora * 7 + 12 * 2 * 8 * 11 + 4 * 100 * 8 * 3
    assert step_flops(SHAPE, work, lora_rank=4, head_trained=False) == expected


def test_static_path_counts_bucket_filler() -> None:
    lengths = [300, 400]
    work = step_work(lengths, 333, engine="fast", static=True)
    filler = bucket_size(700) - 700
    assert filler > 0 and work.positions == bucket_size(700)
    assert work.attention_pairs == 300 * 301 // 2 + 400 * 401 // 2 + filler * (filler + 1) // 2
    assert work.head_rows == bucket_size(333)


def test_unknown_engine_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown engine 'nope'"):
        step_work(LENGTHS, LOSS_TOKENS, engine="nope", static=True)


@pytest.mark.parametrize("name", ["tiny", "qwen2.5-0.5b"])
def test_parameter_counts_match_the_model(name: str) -> None:
    shape = SHAPES[name]
    config = Qwen2Config(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.mlp,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        tie_word_embeddings=True,
    )  # fmt: skip
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    linear = sum(m.weight.numel() for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear))
    assert shape.decoder_params() == linear
    lora = sum(r * (m.in_features + m.out_features) for r in [8] for m in model.model.layers.modules()
               if isinstance(m, torch.nn.Linear))  # fmt: skip
    assert shape.lora_params(8) == lora
    if name == "qwen2.5-0.5b":
        assert sum(p.numel() for p in model.parameters()) == 494_032_768  # Qwen2.5-0.5B's published size
