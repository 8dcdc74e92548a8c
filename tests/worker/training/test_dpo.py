"""DPO on the tiny models: the preference margin grows from zero, the reference is the base with the
adapter disabled, and packed per-sequence log-probs are those of one sequence at a time."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from shared.config import TrainConfig
from shared.metrics import StepMetrics
from tests.data import preference_records
from tests.worker.helpers import CPU, GRAD_ATOL, GRAD_RTOL, grads_of, loss_runs, make_examples, tiny_lora_model
from worker.training.dpo import DpoStep, PreferencePair, tokenize_pair
from worker.training.example import IGNORE_INDEX, Example
from worker.training.library import train_model
from worker.training.loss import LOSS_CHUNK_ROWS
from worker.training.run import TrainingRun
from worker.training.run_io import LocalControl, RunPaths


def _sequence_logps(model: torch.nn.Module, examples: Sequence[Example]) -> torch.Tensor:
    """Each example's summed label log-prob, one sequence at a time (padded to the longest), full logits."""
    width = max(len(e.input_ids) for e in examples)
    out = []
    with torch.no_grad():
        for e in examples:
            n = len(e.input_ids)
            ids = torch.tensor([e.input_ids + [0] * (width - n)])
            mask = torch.tensor([[1] * n + [0] * (width - n)])
            logps = model(input_ids=ids, attention_mask=mask).logits[0, : n - 1].float().log_softmax(-1)
            labels = torch.tensor(e.labels[1:])
            keep = labels != IGNORE_INDEX
            out.append(logps[keep].gather(1, labels[keep, None]).sum())
    return torch.stack(out)


def _margins(step: DpoStep, pairs: Sequence[PreferencePair]) -> torch.Tensor:
    """Per pair: (policy - reference) log-prob of the chosen minus that of the rejected completion."""
    with torch.no_grad():
        policy, reference = step.logps([p.chosen for p in pairs] + [p.rejected for p in pairs])
    ratios = policy - reference
    return ratios[: len(pairs)] - ratios[len(pairs) :]


@pytest.fixture(scope="module")
def reported() -> list[StepMetrics]:
    """The metrics events of `dpo_run`."""
    return []


@pytest.fixture(scope="module")
def dpo_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, reported: list[StepMetrics]) -> TrainingRun:
    config = TrainConfig(model_name=str(tiny_model_dir), method="dpo", dpo_beta=0.1, epochs=6, batch_size=4,
                         learning_rate=1e-2, lora_dropout=0.0)  # fmt: skip
    run = TrainingRun(
        config,
        preference_records(8),
        RunPaths(tmp_path_factory.mktemp("dpo") / "adapter"),
        control=LocalControl(
            on_event=lambda event, _: reported.append(event) if isinstance(event, StepMetrics) else None
        ),
    )
    run.setup()
    return run


def test_a_pair_shares_its_prompt_and_labels_only_each_completion(dpo_run: TrainingRun) -> None:
    record = {
        "input": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                               {"role": "user", "content": "What color is grass?"}]},
        "preferred_output": [{"role": "assistant", "content": "It is green."}],
        "non_preferred_output": [{"role": "assistant", "content": "Meow."}],
    }  # fmt: skip
    pair = tokenize_pair(dpo_run.tokenizer, record, max_length=None, response_template=None)
    assert pair is not None
    assert loss_runs(dpo_run.tokenizer, pair.chosen) == ["It is green.<|im_end|>"]
    assert loss_runs(dpo_run.tokenizer, pair.rejected) == ["Meow.<|im_end|>"]
    prompt = pair.chosen.labels.index(next(t for t in pair.chosen.labels if t != IGNORE_INDEX))
    assert pair.chosen.input_ids[:prompt] == pair.rejected.input_ids[:prompt]
    assert dpo_run.tokenizer.decode(pair.chosen.input_ids[:prompt]).endswith("<|im_start|>assistant\n")


def test_dpo_training_grows_the_preference_margin_from_zero(dpo_run: TrainingRun, reported: list[StepMetrics]) -> None:
    assert len(dpo_run.examples) == 8 and all(isinstance(p, PreferencePair) for p in dpo_run.examples)
    assert dpo_run.engine == "fast"
    assert dpo_run.model is not None
    probe = DpoStep(dpo_run.model, kind="fast", device=CPU, beta=0.1)
    before = _margins(probe, dpo_run.examples)
    assert before.abs().max() < 1e-4  # the adapter starts as the identity: policy == reference
    result = dpo_run.train()
    assert (result.steps, result.stopped) == (12, False)
    after = _margins(probe, dpo_run.examples)
    assert after.mean() > 2.0 and (after > 0).all(), after
    losses = [loss for _, loss in result.losses]
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # log 2: no preference yet
    assert losses[-1] < 0.6  # beta * margin > 0.2
    assert [m.step for m in reported] == list(range(1, 13))
    assert reported[0].reward_margin == pytest.approx(0.0, abs=1e-5) and reported[0].reward_accuracy == 0.0
    assert reported[-1].reward_margin is not None and reported[-1].reward_margin > 0.2
    assert reported[-1].reward_accuracy == 1.0


def test_the_reference_is_the_base_with_the_adapter_disabled(dpo_run: TrainingRun, tiny_model_dir: Path) -> None:
    if dpo_run.model is None or dpo_run.dpo_step is None:
        dpo_run.train()
    assert dpo_run.model is not None
    pairs: list[PreferencePair] = dpo_run.examples[:4]
    examples = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    policy, reference = DpoStep(dpo_run.model, kind="fast", device=CPU, beta=0.1).logps(examples)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    expected = _sequence_logps(base, examples)
    torch.testing.assert_close(reference, expected, rtol=1e-4, atol=1e-4)
    assert (policy.detach() - expected).abs().max() > 0.1  # the trained adapter does change the policy


@pytest.mark.parametrize(("kind", "chunk_rows"), [("fast", LOSS_CHUNK_ROWS), ("fast", 7), ("reference", 0)])
def test_packed_sequence_logps_equal_one_sequence_at_a_time(kind: str, chunk_rows: int) -> None:
    model = tiny_lora_model(modules_to_save=["lm_head"])
    examples = make_examples([5, 31, 12, 2, 20, 9], seed=3)
    step = DpoStep(model, kind=kind, device=CPU, beta=0.1, loss_chunk_rows=chunk_rows or LOSS_CHUNK_ROWS)  # type: ignore[arg-type]
    policy, reference = step.logps(examples)
    torch.testing.assert_close(policy.detach(), _sequence_logps(model, examples), rtol=1e-5, atol=1e-4)
    with model.disable_adapter():
        expected_reference = _sequence_logps(model, examples)
    torch.testing.assert_close(reference, expected_reference, rtol=1e-5, atol=1e-4)
    assert (policy.detach() - reference).abs().max() > 1e-2  # the adapter is not the identity here


def test_the_packed_dpo_step_has_the_padded_steps_loss_and_gradients() -> None:
    examples = make_examples([7, 23, 4, 15, 11, 30], seed=5)
    pairs = [PreferencePair(examples[i], examples[i + 3]) for i in range(3)]
    results = []
    for kind in ("fast", "reference"):
        model = tiny_lora_model(modules_to_save=["lm_head"])
        out = DpoStep(model, kind=kind, device=CPU, beta=0.5)(pairs)  # type: ignore[arg-type]
        results.append((out, grads_of(model)))
    (fast, fast_grads), (padded, padded_grads) = results
    assert out.metrics is not None and set(out.metrics) == {"reward_margin", "reward_accuracy"}
    assert (fast.num_tokens, fast.num_loss_tokens) == (padded.num_tokens, padded.num_loss_tokens)
    torch.testing.assert_close(fast.loss, padded.loss, rtol=1e-5, atol=1e-6)
    assert fast.loss.item() != pytest.approx(0.6931, abs=1e-3)  # the random adapter already prefers a side
    for name, grad in fast_grads.items():
        torch.testing.assert_close(grad, padded_grads[name], rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=name)


def test_a_paused_dpo_run_resumes_to_the_uninterrupted_runs_losses(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = TrainConfig(model_name=str(tiny_model_dir), method="dpo", epochs=2, batch_size=2, learning_rate=1e-2,
                         log_every=1, keep_checkpoints=0, validation_split=0.25)  # fmt: skip
    data = preference_records(8)
    whole = train_model(config, data, output_dir=tmp_path / "whole")
    steps: list[int] = []
    state_dir = tmp_path / "state"
    first = train_model(
        config, data, paths=RunPaths(tmp_path / "resumed", state=state_dir),
        control=LocalControl(on_progress=lambda p: steps.append(p.current_step), stop=lambda: len(steps) >= 3,
                             pause=lambda: True),
    )  # fmt: skip
    assert (first.paused, first.steps) == (True, 3) and [p.name for p in state_dir.iterdir()] == ["step-000003"]
    resumed = train_model(config, data, paths=RunPaths(tmp_path / "resumed", state=state_dir))
    assert (resumed.steps, resumed.stopped, whole.steps) == (6, False, 6)
    assert [s for s, _ in resumed.losses] == [s for s, _ in whole.losses] == list(range(1, 7))
    assert [loss for _, loss in resumed.losses] == pytest.approx([loss for _, loss in whole.losses], rel=1e-4)
    assert [e for e, _ in resumed.eval_losses] == [1, 2]
    assert [v for _, v in resumed.eval_losses] == pytest.approx([v for _, v in whole.eval_losses], rel=1e-4)
