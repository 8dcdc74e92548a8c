"""The fast engine checks itself: the first batch against the reference, compiled and captured steps
against the eager step; a disagreement switches off what disagreed, with a warning, and training goes on."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from shared.events import EventPayload, event_type
from tests.worker.helpers import CPU, make_examples, tiny_lora_model
from worker.training import forward_backward
from worker.training.attention import VarlenKernel
from worker.training.loop import LoopPlan, train_loop
from worker.training.optimizer_step import StaticTrainStep, make_optimizer
from worker.training.run_io import LocalControl
from worker.training.step_check import CHECK_MAX_TOKENS, Tolerance, check_fast_engine, check_sample


def cross_sequence_kernel() -> VarlenKernel:
    """A varlen kernel that ignores the sequence boundaries: what a broken kernel build looks like."""

    def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int,
             scale: float, dropout: float) -> torch.Tensor:  # fmt: skip
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=scale, enable_gqa=True
        )
        return out.transpose(0, 1)

    return VarlenKernel("cross_sequence", call, supports_dropout=False)


def dataset() -> list[Any]:
    return make_examples([12, 30, 7, 21, 16, 9, 25, 11], seed=5)


class Recorder:
    """A run's control that keeps the events it is sent."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any], str]] = []
        self.control = LocalControl(on_event=self.emit)

    def emit(self, event: EventPayload, message: str) -> None:
        self.events.append((event_type(event), event.model_dump(), message))


def test_a_healthy_fast_engine_agrees_with_the_reference_on_the_first_batch() -> None:
    model = tiny_lora_model(modules_to_save=["lm_head", "embed_tokens"], dropout=0.1)
    result = check_fast_engine(model, dataset()[:4], CPU)
    assert result.agrees, result.describe()
    assert result.fast_loss == pytest.approx(result.reference_loss, rel=1e-5)
    assert model.training  # the check ran in eval mode and gave the model back in train mode


def test_a_fast_engine_that_mixes_sequences_is_caught_and_the_job_trains_on_the_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(forward_backward, "select_varlen_kernel", lambda device, dtype: cross_sequence_kernel())
    plan = LoopPlan(epochs=2, batch_size=4, learning_rate=5e-3, check_first_step=True)
    control = Recorder()
    broken = train_loop(tiny_lora_model(), dataset(), plan, device=CPU, engine="fast", control=control.control)
    warnings = [(details, message) for kind, details, message in control.events if kind == "warning"]
    assert len(warnings) == 1, control.events
    details, message = warnings[0]
    assert details["engine"] == "reference" and "disagrees with the reference" in message
    assert abs(details["fast_loss"] - details["reference_loss"]) > 1e-3
    # It trained exactly as a job on the reference engine would have.
    reference = train_loop(tiny_lora_model(), dataset(), plan, device=CPU, engine="reference")
    assert [loss for _, loss in broken.logged_losses] == pytest.approx(
        [loss for _, loss in reference.logged_losses], rel=1e-6
    )


def test_a_healthy_fast_engine_passes_the_check_and_says_so() -> None:
    plan = LoopPlan(epochs=1, batch_size=4, learning_rate=5e-3, check_first_step=True)
    control = Recorder()
    train_loop(tiny_lora_model(), dataset(), plan, device=CPU, engine="fast", control=control.control)
    checks = [(kind, details) for kind, details, _ in control.events if details.get("component") == "engine_check"]
    assert [kind for kind, _ in checks] == ["info"] and checks[0][1]["engine"] == "fast"


def test_a_miscompiled_layer_is_caught_on_its_first_step_and_the_run_goes_on_uncompiled() -> None:
    model = tiny_lora_model()
    params = [p for p in model.parameters() if p.requires_grad]
    warnings: list[str] = []
    step = StaticTrainStep(
        model, make_optimizer(params, 1e-2, CPU, capturable=False), params, device=CPU, max_sequences=4,
        max_grad_norm=1.0, compile=False, cuda_graphs=False,
        on_event=lambda event, message: warnings.append(message) if event_type(event) == "warning" else None,
    )  # fmt: skip
    layer = step.layers[0]

    def miscompiled(*args: Any, **kwargs: Any) -> Any:
        return layer._call_impl(*args, **kwargs).roll(1, dims=1)  # runs, but off by one position

    layer._compiled_call_impl = miscompiled  # what a compiler bug on untested hardware looks like
    step.compiled = True
    out = step(dataset()[:4], 1e-2)
    assert torch.isfinite(out.loss)
    assert not step.compiled and all(layer._compiled_call_impl is None for layer in step.layers)
    assert len(warnings) == 1 and "against the uncompiled step" in warnings[0]
    again = step(dataset()[4:], 1e-2)  # later steps run uncompiled, unchecked, without another warning
    assert torch.isfinite(again.loss) and len(warnings) == 1


def test_tolerance_is_wider_in_half_precision_and_refuses_non_finite_losses() -> None:
    assert Tolerance.for_dtype(torch.bfloat16).agree(2.01, 2.0)
    assert not Tolerance.for_dtype(torch.float32).agree(2.01, 2.0)
    assert not Tolerance.for_dtype(torch.bfloat16).agree(2.2, 2.0)
    assert not Tolerance.for_dtype(torch.float32).agree(float("nan"), 2.0)


def test_the_check_runs_the_shortest_sequences_of_a_batch_within_a_token_bound() -> None:
    batch = make_examples([3000, 12, 2500, 40, 7, 900, 30])
    sample = check_sample(batch)
    assert [len(e.input_ids) for e in sample] == [7, 12, 30, 40]
    long = make_examples([3000, 2500, 2100])
    assert [len(e.input_ids) for e in check_sample(long)] == [2100, 2500]  # two, even past the bound
    assert sum(len(e.input_ids) for e in check_sample(make_examples([900, 1000, 1100]))) <= CHECK_MAX_TOKENS
