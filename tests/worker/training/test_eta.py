"""The ETA estimator on made-up step times: smooth under noise and slow steps, yet following real changes."""

from __future__ import annotations

import itertools
import random

import pytest

from worker.training.eta import EtaEstimator


def _run(durations: list[float], **options: float) -> list[float | None]:
    """The ETAs shown after each step, for steps that took `durations` seconds."""
    eta = EtaEstimator(total_steps=len(durations), **options)  # type: ignore[arg-type]
    now, shown = 0.0, []
    for step, seconds in enumerate(durations, start=1):
        now += seconds
        shown.append(eta.update(step, now))
    return shown


def _noisy(n: int, mean: float, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [mean * rng.uniform(0.6, 1.4) for _ in range(n)]


def test_a_slow_first_step_and_noise_give_a_steady_countdown() -> None:
    # 30 s of loading and compiling in step 1, then ~0.5 s steps with +-40% noise and a 6 s checkpoint write.
    durations = [30.0, 2.0, *_noisy(198, 0.5)]
    durations[100] = 6.0
    shown = _run(durations)
    assert shown[0] is None and shown[1] is None  # warm-up steps are not a rate
    values = [v for v in shown if v is not None]
    assert len(values) >= 190 and values[-1] == 0
    first = next(i for i, v in enumerate(shown) if v is not None)
    truth = [sum(durations[i + 1 :]) for i in range(len(durations))]
    # Close to the truth from its first value: the warm-up's 30 s do not weigh on it.
    assert shown[first] == pytest.approx(truth[first], rel=0.25)
    for a, b in itertools.pairwise(values):
        assert b - a <= 0.05 * a + 2.0, (a, b)  # never jumps up by more than 5% (plus two steps)
    rises = sum(1 for a, b in itertools.pairwise(values) if b > a)
    assert rises <= len(values) // 10  # monotone-ish: it goes down nearly every step
    for i in range(first, len(durations) - 1):
        assert shown[i] == pytest.approx(truth[i], rel=0.4, abs=3.0), i  # the checkpoint write does count


def test_the_naive_estimate_it_replaces_jumps() -> None:
    # The same steps through elapsed / step * steps left (what the loop did before): the 30 s warm-up
    # weighs on every value, so the early ETAs are several times the truth.
    durations = [30.0, 2.0, *_noisy(198, 0.5)]
    elapsed = list(itertools.accumulate(durations))
    naive = [elapsed[i] / (i + 1) * (len(durations) - i - 1) for i in range(len(durations))]
    truth = [sum(durations[i + 1 :]) for i in range(len(durations))]
    assert naive[10] > 3 * truth[10]
    shown = _run(durations)
    assert shown[10] is not None and shown[10] < 1.3 * truth[10]


def test_a_real_slowdown_is_followed() -> None:
    durations = [5.0, *[0.2] * 149, *[0.6] * 150]  # steps get three times slower at step 151
    shown = _run(durations)
    truth = [sum(durations[i + 1 :]) for i in range(len(durations))]
    assert shown[140] == pytest.approx((300 - 141) * 0.2, rel=0.1)  # before: right for the rate then
    assert shown[200] == pytest.approx(truth[200], rel=0.15)  # 50 steps after: right for the new one
    for a, b in itertools.pairwise(v for v in shown if v is not None):
        assert b - a <= 0.05 * a + 2 * 0.6 + 1e-9


def test_a_real_speedup_is_followed() -> None:
    durations = [5.0, *[0.6] * 99, *[0.2] * 400]  # three times faster from step 101
    shown = _run(durations)
    truth = [sum(durations[i + 1 :]) for i in range(len(durations))]
    assert shown[250] == pytest.approx(truth[250], rel=0.2)  # 150 steps (30 s, 15 samples) after


def test_fast_steps_are_timed_in_samples() -> None:
    # GPU steps that only queue work (~0 s) and a logging step every 10 that waits for them all: timed one
    # by one the rate would swing tenfold; timed over seconds it is steady.
    durations = [10.0, *([0.001] * 9 + [0.5]) * 60]
    durations = durations[: len(durations) - 1]
    shown = _run(durations)
    values = [v for v in shown if v is not None]
    for a, b in itertools.pairwise(values):
        assert b - a <= 0.05 * a + 1.0, (a, b)
    truth = [sum(durations[i + 1 :]) for i in range(len(durations))]
    assert shown[300] == pytest.approx(truth[300], rel=0.2)


def test_the_last_step_shows_zero_and_a_short_run_an_eta_from_its_first_timed_step() -> None:
    assert _run([0.01] * 5) == pytest.approx([None, None, 0.02, 0.01, 0.0])
    assert _run([1.0]) == [0.0]


def test_a_short_job_logged_every_step_gets_an_eta_at_its_first_timed_step() -> None:
    # 6 steps of 0.2 s (far less than a whole sample's 2 s) after a 2 s first step: step 3 is the first timed.
    shown = _run([2.0, 0.2, 0.2, 0.2, 0.2, 0.2], log_every=1)
    assert shown == pytest.approx([None, None, 3 * 0.2, 2 * 0.2, 0.2, 0.0])


def test_a_short_job_logged_every_5_steps_gets_an_eta_at_its_first_logging_step() -> None:
    # A GPU's steps 3 and 4 only queue work (~1 ms); step 5 reads the loss back and waits for all three.
    shown = _run([5.0, 0.3, 0.001, 0.001, 0.4, 0.14], log_every=5)
    assert shown[:4] == [None, None, None, None]  # warm-up, then steps whose time is not their cost
    assert shown[4] == pytest.approx((0.001 + 0.001 + 0.4) / 3)  # one step left, at the rate steps 3-5 took
    assert shown[5] == 0.0


def test_steps_between_logging_steps_give_no_early_rate() -> None:
    # Log every 10, the logging step (sync) paying for the nine queued before it: the first ETA comes at
    # step 10, from steps 3-10's real time, not at step 3 from a step that took ~0 s.
    durations = [10.0, *([0.001] * 8 + [0.5]), *([0.001] * 9 + [0.5]) * 30]
    shown = _run(durations, log_every=10)
    assert shown[:9] == [None] * 9
    truth = [sum(durations[i + 1 :]) for i in range(len(durations))]
    assert shown[9] == pytest.approx(truth[9], rel=0.3)
    assert all(v is not None for v in shown[9:])


def test_a_resumed_session_times_from_its_own_first_steps() -> None:
    eta = EtaEstimator(total_steps=100)
    shown = [eta.update(step, now) for step, now in zip(range(51, 101), itertools.count(20.0, 2.0), strict=False)]
    assert shown[0] is None and shown[1] is None
    assert shown[2] == pytest.approx(47 * 2.0)
    assert shown[-1] == 0.0
