"""Resumable training state: a paused or crashed run goes on exactly where it stood, never from a
state of another config, never from a half-written one.

Tolerance: on CPU in fp32 a resumed run repeats the uninterrupted run's arithmetic, so its losses
and weights match to LOSS_RTOL (1e-6 relative); they are usually bit-identical.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from shared.config import TrainConfig
from shared.events import EventPayload, event_type
from shared.jobs import Progress
from tests.data import easy_records
from tests.service import wait_until
from tests.worker.helpers import CPU, make_examples, tiny_lora_model
from worker.training.library import TrainResult, train_model
from worker.training.loop import LoopHooks, LoopPlan, train_loop
from worker.training.run_io import LocalControl, RunPaths
from worker.training.state_writer import StateWriter
from worker.training.train_state import STATE_META, STATE_TENSORS, LoopState, load_train_state, save_train_state

LOSS_RTOL = 1e-6
# 10 records, 2 held out for validation: 8 examples, batch 2 -> 4 steps per epoch, 8 in all.
STEPS = 8


class Crash(Exception):
    """Stands for the worker dying mid-run."""


def config(tiny_model_dir: Path, **changes: Any) -> TrainConfig:
    options: dict[str, Any] = dict(
        model_name=str(tiny_model_dir), epochs=2, batch_size=2, learning_rate=1e-2, validation_split=0.2,
        lora_dropout=0.1, log_every=1, keep_checkpoints=1, seed=7, attn_implementation="sdpa",
    )  # fmt: skip
    return TrainConfig(**{**options, **changes})


@dataclass
class Session:
    """One `train_model` call: its result and what it reported."""

    result: TrainResult | None = None
    steps: list[int] = field(default_factory=list)
    events: list[tuple[str, str]] = field(default_factory=list)  # (type, message)

    def messages(self, kind: str) -> list[str]:
        return [message for etype, message in self.events if etype == kind]


def resumes(session: Session) -> list[str]:
    """What a session said about resuming (exactly one line where it resumed)."""
    return [message for message in session.messages("info") if message.startswith("resuming")]


def run(
    cfg: TrainConfig,
    folder: Path,
    *,
    state_dir: Path | None,
    stop_after: int | None = None,
    pause: bool = False,
    crash_at: int | None = None,
    on_step: Callable[[int], None] | None = None,
    state_every: int = 0,
    state_every_s: float = 0.0,
) -> Session:
    """Train into `folder/adapter` (checkpoints in `folder/checkpoints`); stop (a pause when `pause`)
    once `stop_after` steps ran in this session, or raise `Crash` from the progress report of step
    `crash_at`."""
    session = Session()

    def on_progress(progress: Progress) -> None:
        session.steps.append(progress.current_step)
        if on_step is not None:
            on_step(progress.current_step)
        if progress.current_step == crash_at:
            raise Crash

    def on_event(payload: EventPayload, message: str) -> None:
        session.events.append((event_type(payload), message))

    session.result = train_model(
        cfg, easy_records(10),
        paths=RunPaths(folder / "adapter", checkpoints=folder / "checkpoints", state=state_dir,
                       state_every=state_every, state_every_s=state_every_s),
        control=LocalControl(on_progress=on_progress, on_event=on_event, pause=lambda: pause,
                             stop=lambda: stop_after is not None and len(session.steps) >= stop_after),
    )  # fmt: skip
    return session


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainResult, Path]:
    """The uninterrupted run every resumed one must reproduce, and its adapter folder."""
    folder = tmp_path_factory.mktemp("reference")
    result = run(config(tiny_model_dir), folder, state_dir=None).result
    assert result is not None and result.steps == STEPS and len(result.losses) == STEPS
    return result, folder / "adapter"


def assert_same_run(result: TrainResult, adapter: Path, reference: tuple[TrainResult, Path]) -> None:
    ref, ref_adapter = reference
    assert (result.steps, result.stopped, result.paused) == (STEPS, False, False)
    assert [s for s, _ in result.losses] == [s for s, _ in ref.losses] == list(range(1, STEPS + 1))
    assert [loss for _, loss in result.losses] == pytest.approx([loss for _, loss in ref.losses], rel=LOSS_RTOL)
    assert result.final_loss == pytest.approx(ref.final_loss, rel=LOSS_RTOL)
    assert [e for e, _ in result.eval_losses] == [1, 2]
    assert [v for _, v in result.eval_losses] == pytest.approx([v for _, v in ref.eval_losses], rel=LOSS_RTOL)
    assert result.total_tokens == ref.total_tokens
    weights, ref_weights = (load_file(str(a / "adapter_model.safetensors")) for a in (adapter, ref_adapter))
    assert weights.keys() == ref_weights.keys() and weights
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, ref_weights[name], rtol=LOSS_RTOL, atol=1e-7, msg=name)


def test_pause_and_resume_match_an_uninterrupted_run(
    tiny_model_dir: Path, tmp_path: Path, reference: tuple[TrainResult, Path]
) -> None:
    state_dir = tmp_path / "state"
    first = run(config(tiny_model_dir), tmp_path, state_dir=state_dir, stop_after=6, pause=True)
    assert first.result is not None
    assert (first.result.stopped, first.result.paused, first.result.steps) == (True, True, 6)
    assert first.result.output_dir is None and not (tmp_path / "adapter").exists()
    assert sorted(p.name for p in state_dir.iterdir()) == ["step-000006"]  # saved where it stopped, mid-epoch 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000004"]

    second = run(config(tiny_model_dir), tmp_path, state_dir=state_dir)
    assert second.result is not None
    assert resumes(second) == ["resuming from step 6/8 (epoch 2)"]
    assert second.steps == [7, 8]
    assert [m.split(",")[0] for m in second.messages("epoch")] == ["epoch 2/2 done"]  # epoch 1 is not redone
    assert_same_run(second.result, tmp_path / "adapter", reference)
    # The first session's checkpoint was known to the second, so keep_checkpoints=1 pruned it.
    assert [c.step for c in second.result.checkpoints] == [8]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000008"]
    assert not state_dir.exists()  # the adapter is saved: nothing left to resume


def test_a_crashed_run_resumes_from_its_last_saved_step(
    tiny_model_dir: Path, tmp_path: Path, reference: tuple[TrainResult, Path]
) -> None:
    state_dir = tmp_path / "state"
    # Saved at steps 3, 4 (epoch end), 6 and 8 (epoch end); the crash comes after step 7.
    with pytest.raises(Crash):
        run(config(tiny_model_dir), tmp_path, state_dir=state_dir, crash_at=7, state_every=3)
    assert sorted(p.name for p in state_dir.iterdir()) == ["step-000006"]

    second = run(config(tiny_model_dir), tmp_path, state_dir=state_dir, state_every=3)
    assert second.result is not None
    assert resumes(second) == ["resuming from step 6/8 (epoch 2)"]
    assert second.steps == [7, 8]
    assert_same_run(second.result, tmp_path / "adapter", reference)


def test_saves_by_the_clock_are_written_in_the_background_and_resume_exactly(
    tiny_model_dir: Path, tmp_path: Path, reference: tuple[TrainResult, Path]
) -> None:
    state_dir = tmp_path / "state"
    # Every step is past a nanosecond: each takes a save unless the previous write is still running
    # (then the next step does), so whether the crash finds step 1 or 2 saved is up to this machine's
    # speed. It comes before the first epoch end (step 4): any state saved is one the clock asked for.
    with pytest.raises(Crash):
        run(config(tiny_model_dir), tmp_path, state_dir=state_dir, crash_at=3, state_every_s=1e-9)
    [saved] = list(state_dir.iterdir())  # the write in flight was waited for, older states pruned
    step = int(saved.name.removeprefix("step-"))
    assert step in (1, 2)

    second = run(config(tiny_model_dir), tmp_path, state_dir=state_dir, state_every_s=1e-9)
    assert second.result is not None
    assert resumes(second) == [f"resuming from step {step}/8 (epoch 1)"]
    assert second.steps == list(range(step + 1, STEPS + 1))
    assert_same_run(second.result, tmp_path / "adapter", reference)
    assert not second.messages("warning")
    assert not state_dir.exists()  # no write was left running to recreate it after the adapter was saved


def test_a_saved_state_holds_the_trained_parameters_only(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The seed's modules_to_save (lm_head + embed_tokens, tied in the tiny model): the state holds their
    one trained copy and its moments, never a frozen `original_module` or the base model's embedding."""
    state_dir = tmp_path / "state"
    session = run(config(tiny_model_dir), tmp_path, state_dir=state_dir, stop_after=3, pause=True)
    assert config(tiny_model_dir).lora_modules_to_save == ["lm_head", "embed_tokens"]
    [trained_count] = [
        int(m.split()[1].replace(",", "")) for m in session.messages("info") if m.startswith("training ")
    ]
    tensors = torch.load(state_dir / "step-000003" / STATE_TENSORS, map_location="cpu", weights_only=True)
    params: dict[str, torch.Tensor] = tensors["params"]
    assert not [
        name for name in params if "original_module" in name or not ("lora_" in name or "modules_to_save" in name)
    ]
    assert sum(t.numel() for t in params.values()) == trained_count
    embedding_shape = (480, 64)  # tests.fixtures.tiny_model: its vocabulary by hidden size
    assert [n for n, t in params.items() if tuple(t.shape) == embedding_shape] == [
        "base_model.model.model.embed_tokens.modules_to_save.default.weight"  # lm_head's copy is this one, tied
    ]
    moments = [t for per_param in tensors["optimizer"]["state"].values() for t in per_param.values()]
    assert len(tensors["optimizer"]["state"]) == len(params)
    assert sum(tuple(t.shape) == embedding_shape for t in moments) == 2  # exp_avg, exp_avg_sq of that copy
    # Each tensor was saved on its own, not as a view dragging a larger (frozen) storage into the file.
    for tensor in [*params.values(), *moments]:
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()


def test_a_state_of_another_config_is_not_applied(
    tiny_model_dir: Path, tmp_path: Path, reference: tuple[TrainResult, Path]
) -> None:
    state_dir = tmp_path / "state"
    other = run(config(tiny_model_dir, learning_rate=5e-3), tmp_path, state_dir=state_dir, stop_after=3, pause=True)
    assert other.result is not None and other.result.paused
    assert sorted(p.name for p in state_dir.iterdir()) == ["step-000003"]

    second = run(config(tiny_model_dir), tmp_path, state_dir=state_dir)
    assert second.result is not None
    assert second.messages("warning") == [
        "saved training state not used: step-000003: made with another config or dataset"
    ]
    assert not any(m.startswith("resuming") for m in second.messages("info"))
    assert second.steps == list(range(1, STEPS + 1))  # from the start, hence exactly the reference run
    assert_same_run(second.result, tmp_path / "adapter", reference)


def test_a_half_written_or_damaged_state_is_never_applied(
    tiny_model_dir: Path, tmp_path: Path, reference: tuple[TrainResult, Path]
) -> None:
    state_dir = tmp_path / "state"
    run(config(tiny_model_dir), tmp_path, state_dir=state_dir, stop_after=6, pause=True)
    good = state_dir / "step-000006"
    # A staging folder a crash left behind (complete-looking, but never renamed into place) ...
    staged = state_dir / ".step-000007.abcd1234.tmp"
    shutil.copytree(good, staged)
    _set_step(staged, 7)
    # ... and a newer state whose tensors file was cut short.
    damaged = state_dir / "step-000007"
    shutil.copytree(good, damaged)
    _set_step(damaged, 7)
    tensors = (damaged / STATE_TENSORS).read_bytes()
    (damaged / STATE_TENSORS).write_bytes(tensors[: len(tensors) // 2])

    def states() -> list[str]:
        return sorted(p.name for p in state_dir.iterdir())

    seen_at_step_8: list[str] = []  # the state folder once step 7's save is written (before step 8's)

    def on_step(step: int) -> None:
        if step == 8:  # step 7's state is written in the background: wait for the folder to settle
            seen_at_step_8.extend(wait_until(lambda: states() if states() == ["step-000007"] else None,
                                             timeout=60, every=0.05, what=lambda: f"step 7's save; {states()}"))  # fmt: skip

    second = run(config(tiny_model_dir), tmp_path, state_dir=state_dir, state_every=1, on_step=on_step)
    assert second.result is not None
    warnings = second.messages("warning")
    assert len(warnings) == 1 and warnings[0].startswith("saved training state not used: step-000007: unreadable")
    assert resumes(second) == ["resuming from step 6/8 (epoch 2)"]
    # The first save after the resume (step 7) removed the staging folder and every older state.
    assert seen_at_step_8 == ["step-000007"]
    assert_same_run(second.result, tmp_path / "adapter", reference)
    assert not state_dir.exists()


def _set_step(folder: Path, step: int) -> None:
    meta = json.loads((folder / STATE_META).read_text())
    (folder / STATE_META).write_text(json.dumps({**meta, "step": step}))


def test_train_loop_resumes_where_it_paused_with_the_same_random_draws(tmp_path: Path) -> None:
    """The loop alone, with dropout: parameters, AdamW moments, schedule, data position and RNG."""
    examples = make_examples([12, 9, 15, 10, 7, 11, 8], seed=3)  # batch 2: 4 steps per epoch, the last holds 1
    plan = LoopPlan(epochs=2, batch_size=2, learning_rate=1e-2, seed=5)
    whole = train_loop(tiny_lora_model(dropout=0.1), examples, plan, device=CPU)
    saved: list[int] = []

    def write(folder: Path, state: LoopState, fingerprint: str) -> Path:
        saved.append(state.step)
        return save_train_state(folder, state, fingerprint=fingerprint)

    steps: list[int] = []
    with StateWriter(tmp_path, fingerprint="f", emit=lambda event, message: None, write=write) as writer:
        paused = train_loop(
            tiny_lora_model(dropout=0.1), examples, plan, device=CPU,
            control=LocalControl(stop=lambda: len(steps) >= 5, pause=lambda: True),
            hooks=LoopHooks(on_step=lambda info: steps.append(info.step), save_state=writer),
        )  # fmt: skip
    assert (paused.stopped, paused.paused, paused.steps_done) == (True, True, 5)
    assert saved == [4, 5]  # epoch 1's end, then the pause (mid-epoch 2)
    assert load_train_state(tmp_path, fingerprint="other").state is None
    loaded = load_train_state(tmp_path, fingerprint="f").state
    assert loaded is not None and (loaded.step, loaded.epoch, loaded.batch_index) == (5, 2, 1)
    resumed = train_loop(tiny_lora_model(dropout=0.1), examples, plan, device=CPU, resume=loaded)
    assert [s for s, _ in resumed.logged_losses] == list(range(1, 9))
    assert [v for _, v in resumed.logged_losses] == pytest.approx([v for _, v in whole.logged_losses], rel=LOSS_RTOL)
    assert resumed.total_tokens == whole.total_tokens and resumed.steps_done == 8
