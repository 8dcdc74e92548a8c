"""The training loop: converges, reports steps and epochs, stops when asked; both engines agree."""

from __future__ import annotations

import itertools

import pytest

from tests.worker.helpers import CPU, make_examples, tiny_lora_model
from worker.training.attention import EngineKind
from worker.training.example import Example
from worker.training.loop import LoopHooks, LoopPlan, StepInfo, train_loop
from worker.training.run_io import LocalControl


def easy_dataset() -> list[Example]:
    return make_examples([12, 9, 15, 10], seed=3) * 4


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_train_loop_converges_and_token_accuracy_rises(engine: EngineKind) -> None:
    model = tiny_lora_model(modules_to_save=["lm_head"])
    steps: list[StepInfo] = []
    epochs: list[float | None] = []
    result = train_loop(
        model, easy_dataset(), LoopPlan(epochs=8, batch_size=4, learning_rate=1e-2), device=CPU, engine=engine,
        hooks=LoopHooks(on_step=steps.append, on_epoch_end=lambda epoch, loss, accuracy: epochs.append(accuracy)),
    )  # fmt: skip
    first, last = result.logged_losses[0][1], result.final_loss
    assert result.steps_done == 32 and not result.stopped
    assert last is not None and last < 0.5 * first, (first, last)
    accuracies = [s.accuracy for s in steps]
    assert all(a is not None and 0.0 <= a <= 1.0 for a in accuracies), accuracies
    assert all(a is not None and 0.0 <= a <= 1.0 for a in epochs) and len(epochs) == 8
    # A random model on random tokens starts near chance (1/256); memorising 4 sequences lifts it well above.
    assert accuracies[0] is not None and accuracies[0] < 0.1
    assert accuracies[-1] is not None and accuracies[-1] > accuracies[0] + 0.3, accuracies
    assert epochs[-1] is not None and epochs[0] is not None and epochs[-1] > epochs[0]


def test_both_engines_follow_the_same_trajectory() -> None:
    finals = []
    engines: tuple[EngineKind, ...] = ("fast", "reference")
    for engine in engines:
        result = train_loop(
            tiny_lora_model(), easy_dataset(), LoopPlan(epochs=3, batch_size=4, learning_rate=5e-3), device=CPU,
            engine=engine,
        )  # fmt: skip
        finals.append(result.final_loss)
    assert finals[0] == pytest.approx(finals[1], rel=1e-3)


def test_train_loop_reports_steps_and_epochs() -> None:
    examples = make_examples([6, 8, 10, 7, 9])  # 5 examples, batch 2: 3 steps per epoch, last holds 1
    steps: list[StepInfo] = []
    epochs: list[tuple[int, float | None]] = []
    result = train_loop(
        tiny_lora_model(dropout=0.05),
        examples,
        LoopPlan(epochs=2, batch_size=2, learning_rate=1e-3, log_every=2),
        device=CPU,
        hooks=LoopHooks(on_step=steps.append, on_epoch_end=lambda e, loss, accuracy: epochs.append((e, loss))),
    )
    assert [s.step for s in steps] == [1, 2, 3, 4, 5, 6]
    assert all(s.total_steps == 6 and s.epochs == 2 for s in steps)
    assert [s.epoch for s in steps] == [1, 1, 1, 2, 2, 2]
    assert [s.loss is not None for s in steps] == [False, True, False, True, False, True]
    assert [s.grad_norm is not None for s in steps] == [False, True, False, True, False, True]
    assert steps[0].learning_rate == pytest.approx(1e-3)
    assert all(a.learning_rate > b.learning_rate > 0 for a, b in itertools.pairwise(steps))
    assert all(s.tokens_per_second > 0 and (s.eta_seconds is None or s.eta_seconds >= 0) for s in steps)
    # Steps 1-2 warm up; step 3's time is real only at the next logging step (4), which gives the first ETA.
    assert [s.eta_seconds is not None for s in steps] == [False, False, False, True, True, True]
    assert steps[3].eta_seconds is not None and steps[3].eta_seconds > 0 and steps[-1].eta_seconds == 0
    assert all(s.elapsed_s > 0 for s in steps)
    assert sum(s.num_tokens for s in steps[:3]) == sum(s.num_tokens for s in steps[3:]) == 40
    assert sum(s.num_tokens for s in steps) == result.total_tokens == 80
    assert [e for e, _ in epochs] == [1, 2] and all(isinstance(loss, float) for _, loss in epochs)
    assert result.logged_losses == [(s.step, s.loss) for s in steps if s.loss is not None]
    assert result.final_loss == steps[-1].loss and result.elapsed_s > 0


def test_should_stop_ends_the_loop() -> None:
    seen: list[int] = []
    result = train_loop(
        tiny_lora_model(),
        easy_dataset(),
        LoopPlan(epochs=5, batch_size=4, learning_rate=1e-3),
        device=CPU,
        control=LocalControl(stop=lambda: len(seen) >= 3),
        hooks=LoopHooks(on_step=lambda info: seen.append(info.step)),
    )
    assert result.stopped and result.steps_done == 3 and seen == [1, 2, 3]
    assert result.final_loss is not None


def test_should_stop_before_the_first_step() -> None:
    result = train_loop(
        tiny_lora_model("sdpa"),
        easy_dataset(),
        LoopPlan(epochs=1, batch_size=4, learning_rate=1e-3),
        device=CPU,
        engine="reference",
        control=LocalControl(stop=lambda: True),
    )
    assert result.stopped and result.steps_done == 0 and result.final_loss is None
