"""Saves that don't stop training: the loop snapshots its state, one background thread writes it.

Every test drives the real loop and the real `StateWriter` on the CPU with a tiny model. Where timing
would decide what a test sees, the write is held on a `threading.Event` (a slow disk, made
deterministic) and the clock is the test's own, so no assert depends on how fast this machine is.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from shared.events import EventPayload, event_type
from tests.worker.helpers import CPU, make_examples, tiny_lora_model
from worker.training.example import Example
from worker.training.loop import LoopHooks, LoopPlan, LoopResult, StepInfo, train_loop
from worker.training.run_io import LocalControl
from worker.training.state_writer import StateSaveError, StateWriter
from worker.training.train_state import LoopState, load_train_state, save_train_state

LOSS_RTOL = 1e-6
WAIT_S = 30.0  # a held write is released well before this; the bound only keeps a broken test from hanging


def examples() -> list[Example]:
    return make_examples([12, 9, 15, 10, 7, 11, 8], seed=3)  # batch 2: 4 steps per epoch, the last holds 1


def plan(epochs: int = 2, state_every_s: float = 0.0) -> LoopPlan:
    return LoopPlan(epochs=epochs, batch_size=2, learning_rate=1e-2, seed=5, state_every_s=state_every_s)


class Writes:
    """The writer's `write`: `save_train_state`, recording which state was written on which thread, and
    holding the write of `hold_step` until `release` is set."""

    def __init__(self, hold_step: int | None = None) -> None:
        self.steps: list[int] = []
        self.threads: list[int] = []
        self.hold_step = hold_step
        self.release = threading.Event()

    def __call__(self, folder: Path, state: LoopState, fingerprint: str) -> Path:
        if state.step == self.hold_step:
            assert self.release.wait(WAIT_S), "a held write was never released"
        self.steps.append(state.step)
        self.threads.append(threading.get_ident())
        return save_train_state(folder, state, fingerprint=fingerprint)


def train(
    writer: StateWriter,
    loop_plan: LoopPlan,
    *,
    on_step: Callable[[StepInfo], None] | None = None,
    stop_after: int | None = None,
    resume: LoopState | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> LoopResult:
    steps: list[int] = []

    def step_done(info: StepInfo) -> None:
        steps.append(info.step)
        if on_step is not None:
            on_step(info)

    return train_loop(
        tiny_lora_model(dropout=0.1), examples(), loop_plan, device=CPU, resume=resume,
        control=LocalControl(stop=lambda: stop_after is not None and len(steps) >= stop_after, pause=lambda: True),
        hooks=LoopHooks(on_step=step_done, save_state=writer), clock=clock,
    )  # fmt: skip


def test_states_are_written_by_a_thread_other_than_the_training_thread(tmp_path: Path) -> None:
    writes = Writes()
    with StateWriter(tmp_path, fingerprint="f", emit=_no_events, write=writes) as writer:
        train(writer, plan())
    assert writes.steps == [4, 8]  # the epoch ends
    assert threading.get_ident() not in writes.threads and len(set(writes.threads)) == 1
    loaded = load_train_state(tmp_path, fingerprint="f").state
    assert loaded is not None and loaded.step == 8


def test_a_pause_save_is_on_disk_when_the_loop_returns(tmp_path: Path) -> None:
    writes = Writes(hold_step=5)

    def on_step(info: StepInfo) -> None:
        # The pause's write (right after step 5) is let go half a second later: a loop that returned
        # without waiting for it would find no state below.
        if info.step == 5:
            threading.Timer(0.5, writes.release.set).start()

    with StateWriter(tmp_path, fingerprint="f", emit=_no_events, write=writes) as writer:
        result = train(writer, plan(), stop_after=5, on_step=on_step)
        assert (result.paused, result.steps_done) == (True, 5)
        loaded = load_train_state(tmp_path, fingerprint="f").state
        assert loaded is not None and (loaded.step, loaded.epoch, loaded.batch_index) == (5, 2, 1)


def test_saves_are_due_by_the_clock_between_epoch_ends(tmp_path: Path) -> None:
    now = [0.0]  # the test's clock: each step takes 100 s
    writes = Writes()
    with StateWriter(tmp_path, fingerprint="f", emit=_no_events, write=writes) as writer:

        def on_step(info: StepInfo) -> None:
            now[0] = 100.0 * info.step
            writer.flush()  # each write is done before the next check: only the clock decides

        train(writer, plan(state_every_s=250.0), on_step=on_step, clock=lambda: now[0])
    # 300 s after the start, then the epoch end (400 s), then 300 s after that, then the epoch end.
    assert writes.steps == [3, 4, 7, 8]


def test_a_time_triggered_save_does_not_wait_for_the_write_in_flight(tmp_path: Path) -> None:
    now = [0.0]
    writes = Writes(hold_step=1)
    with StateWriter(tmp_path, fingerprint="f", emit=_no_events, write=writes) as writer:

        def on_step(info: StepInfo) -> None:
            now[0] = 100.0 * info.step  # every step is past `state_every_s`
            if info.step == 3:
                writes.release.set()
                writer.flush()

        result = train(writer, plan(epochs=1, state_every_s=1.0), on_step=on_step, clock=lambda: now[0])
    # Step 1's write was held through step 2, which trained on and skipped its save; step 3 took it.
    assert result.steps_done == 4
    assert writes.steps == [1, 3, 4]


def test_a_snapshot_keeps_its_steps_values_while_training_goes_on_and_resumes_exactly(tmp_path: Path) -> None:
    whole = train_loop(tiny_lora_model(dropout=0.1), examples(), plan(), device=CPU)
    writes = Writes(hold_step=4)

    def on_step(info: StepInfo) -> None:
        if info.step == 6:  # steps 5 and 6 changed every parameter and moment before step 4's write ran
            writes.release.set()
            raise RuntimeError("the worker dies")

    with (
        pytest.raises(RuntimeError, match="the worker dies"),
        StateWriter(tmp_path, fingerprint="f", emit=_no_events, write=writes) as writer,
    ):
        train(writer, plan(), on_step=on_step)
    assert writes.steps == [4]  # leaving the writer waited for the held write
    loaded = load_train_state(tmp_path, fingerprint="f").state
    assert loaded is not None and (loaded.step, loaded.epoch, loaded.batch_index) == (4, 2, 0)
    resumed = train_loop(tiny_lora_model(dropout=0.1), examples(), plan(), device=CPU, resume=loaded)
    assert [s for s, _ in resumed.logged_losses] == list(range(1, 9))
    assert [v for _, v in resumed.logged_losses] == pytest.approx([v for _, v in whole.logged_losses], rel=LOSS_RTOL)


def test_a_failed_write_is_a_warning_event_and_training_goes_on(tmp_path: Path) -> None:
    blocked = tmp_path / "state"
    blocked.write_text("a file where the state folder should be")
    seen: list[tuple[str, str]] = []
    with StateWriter(blocked, fingerprint="f", emit=lambda e, m: seen.append((event_type(e), m))) as writer:
        result = train(writer, plan())
    assert result.steps_done == 8 and not result.stopped
    warnings = [m for kind, m in seen if kind == "warning"]
    assert [m.split(" (")[0] for m in warnings] == [
        "saving the training state of step 4 failed",
        "saving the training state of step 8 failed",
    ]


def test_a_pause_whose_state_cannot_be_written_fails_loudly(tmp_path: Path) -> None:
    blocked = tmp_path / "state"
    blocked.write_text("a file where the state folder should be")
    with (
        StateWriter(blocked, fingerprint="f", emit=_no_events) as writer,
        pytest.raises(StateSaveError, match="step 3"),
    ):
        train(writer, plan(), stop_after=3)


def _no_events(event: EventPayload, message: str) -> None:
    raise AssertionError(f"unexpected event: {message}")
