"""Static shapes and compiled layers train exactly like the eager step; fallbacks are reported.

CUDA-graph capture itself needs a GPU: `make gpu-check` compares captured against eager steps there.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from shared.events import event_type
from tests.worker.helpers import CPU, make_examples, tiny_lora_model
from worker.training.forward_backward import make_step_fn
from worker.training.optimizer_step import EagerTrainStep, StaticTrainStep, make_optimizer

LENGTHS = [[12, 30, 7, 21], [16, 9, 25, 11], [40, 3, 8, 19], [100, 120, 90, 60]]  # the last: another bucket


def run_steps(make_step: Any, model: Any) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    step = make_step(model, params)
    losses = []
    for i, lengths in enumerate(LENGTHS):
        out = step(make_examples(lengths, seed=i), 1e-2)
        assert out.grad_norm.item() > 0
        losses.append(out.loss.item())
    return losses


def eager(model: Any, params: list[torch.nn.Parameter]) -> EagerTrainStep:
    optimizer = make_optimizer(params, 1e-2, CPU, capturable=False)
    return EagerTrainStep(make_step_fn(model, kind="fast", device=CPU), optimizer, params, 1.0)


def static(compile: bool, events: list[tuple[str, str]]) -> Any:
    def make(model: Any, params: list[torch.nn.Parameter]) -> StaticTrainStep:
        optimizer = make_optimizer(params, 1e-2, CPU, capturable=False)
        return StaticTrainStep(
            model, optimizer, params, device=CPU, max_sequences=4, max_grad_norm=1.0, compile=compile,
            cuda_graphs=False, on_event=lambda event, message: events.append((event_type(event), message)),
        )  # fmt: skip

    return make


def test_static_shapes_follow_the_eager_trajectory() -> None:
    want = run_steps(eager, tiny_lora_model(modules_to_save=["lm_head", "embed_tokens"]))
    got = run_steps(static(compile=False, events=[]), tiny_lora_model(modules_to_save=["lm_head", "embed_tokens"]))
    assert got == pytest.approx(want, rel=1e-5)


# Dynamo's tracing of the compiled layers reads `.grad` of non-leaf tensors internally and warns.
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf Tensor:UserWarning")
def test_compiled_static_steps_follow_the_eager_trajectory_with_attention_dropout() -> None:
    """torch.compile(dynamic=True) of the decoder layers: one compile for every bucket; attention dropout on."""
    events: list[tuple[str, str]] = []
    want = run_steps(eager, tiny_lora_model())
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    got = run_steps(static(compile=True, events=events), tiny_lora_model())
    assert got == pytest.approx(want, rel=1e-4)
    assert events == []  # compiled, checked against the eager step, without falling back
    # Two buckets (256 and 384 tokens), two layers, one graph each: no recompile for the second bucket.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 2
    torch.manual_seed(0)
    dropout_losses = run_steps(static(compile=True, events=events), tiny_lora_model(attention_dropout=0.2))
    assert all(torch.isfinite(torch.tensor(dropout_losses)))
    # Dropout makes a train-mode step differ from its eval-mode check: it is not checked, and says so.
    assert [kind for kind, _ in events] == ["info"] and "not checked" in events[0][1]


def test_a_failing_compiled_step_falls_back_to_eager_with_a_warning() -> None:
    events: list[tuple[str, str]] = []
    model = tiny_lora_model()
    params = [p for p in model.parameters() if p.requires_grad]
    step = static(compile=True, events=events)(model, params)
    layer = step.layers[0]

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("inductor exploded")

    layer._compiled_call_impl = broken  # what a compiler failure at the first call looks like
    out = step(make_examples([12, 30]), 1e-2)
    assert torch.isfinite(out.loss) and not step.compiled
    assert events and events[0][0] == "warning" and "inductor exploded" in events[0][1]
    assert all(layer._compiled_call_impl is None for layer in step.layers)


def test_cuda_graphs_need_cuda() -> None:
    model = tiny_lora_model()
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        StaticTrainStep(model, None, params, device=CPU, max_sequences=4, max_grad_norm=1.0, compile=False,
                        cuda_graphs=True)  # fmt: skip
