"""The TRL baseline the benchmark compares against runs on the CPU."""

from __future__ import annotations

from pathlib import Path

from peft import LoraConfig
from transformers import AutoModelForCausalLM

from tests.worker.helpers import make_examples


def test_trl_baseline_runs_a_few_steps_on_cpu(tiny_model_dir: Path) -> None:
    from peft import get_peft_model as wrap
    from transformers import AutoTokenizer

    from bench.trl_baseline import run_trl_baseline

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
