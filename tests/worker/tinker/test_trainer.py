"""The Tinker trainer on the tiny model: logprobs equal a plain transformers forward, each loss equals its
formula, gradients accumulate until optim_step, and checkpoints round-trip."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from shared.config import TrainConfig
from shared.tinker_ops import ForwardOp, OptimStepOp, TinkerDatum
from worker.tinker.lora import add_client_adapter, apply_lora
from worker.tinker.together import forward_together
from worker.tinker.trainer import CheckpointError, TinkerTrainer
from worker.training.model_loading import load_base_model


def _trainer(model_dir: Path, engine: str = "fast", rank: int = 4) -> TinkerTrainer:
    config = TrainConfig(model_name=str(model_dir), engine=engine)  # type: ignore[arg-type]
    base, _tokenizer, engine_used = load_base_model(config, torch.device("cpu"))
    model = apply_lora(base, rank=rank, seed=0)
    return TinkerTrainer(model, engine=engine_used, base=str(model_dir), rank=rank)


def _data(n: int = 3, seed: int = 0, vocab: int = 200) -> list[TinkerDatum]:
    gen = torch.Generator().manual_seed(seed)
    data = []
    for i in range(n):
        length = 5 + 3 * i
        seq = torch.randint(1, vocab, (length + 1,), generator=gen).tolist()
        weights = [0.0] * 2 + [1.0] * (length - 2)
        adv = torch.randn(length, generator=gen).tolist()
        data.append(TinkerDatum(tokens=seq[:-1], target_tokens=seq[1:], weights=weights,
                                logprobs=[-2.0 + 0.1 * j for j in range(length)], advantages=adv))  # fmt: skip
    return data


def _plain_logprobs(model_dir: Path, data: list[TinkerDatum]) -> list[list[float]]:
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    out = []
    with torch.no_grad():
        for d in data:
            logits = model(input_ids=torch.tensor([d.tokens])).logits[0].float()
            lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(d.target_tokens)[:, None])[:, 0]
            out.append(lp.tolist())
    return out


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_forward_logprobs_equal_a_plain_forward_before_any_step(tiny_model_dir: Path, engine: str) -> None:
    trainer = _trainer(tiny_model_dir, engine)
    data = _data()
    result = trainer.forward(ForwardOp(op="forward", loss_fn="cross_entropy", data=data))
    expected = _plain_logprobs(tiny_model_dir, data)
    for got, want in zip(result.loss_fn_outputs, expected, strict=True):
        assert got["logprobs"] == pytest.approx(want, abs=2e-5)
    total = -sum(w * lp for d, out in zip(data, result.loss_fn_outputs, strict=True)
                 for w, lp in zip(d.weights or [], out["logprobs"], strict=True))  # fmt: skip
    assert result.metrics["loss:sum"] == pytest.approx(total, rel=1e-5)
    assert all(p.grad is None for p in trainer.params)  # forward keeps no graph


def _formula(name: str, lp: list[float], d: TinkerDatum, config: dict[str, float]) -> float:
    total = 0.0
    for i, x in enumerate(lp):
        s, a = d.logprobs[i], d.advantages[i]  # type: ignore[index]
        r = math.exp(x - s)
        lo, hi = config.get("clip_low_threshold", 0.8), config.get("clip_high_threshold", 1.2)
        if name == "importance_sampling":
            total -= r * a
        elif name == "ppo":
            total -= min(r * a, min(max(r, lo), hi) * a)
        elif name == "cispo":
            total -= min(max(r, lo), hi) * x * a
        elif name == "dro":
            total -= x * a - 0.5 * config["beta"] * (x - s) ** 2
    return total


@pytest.mark.parametrize(
    ("name", "config"),
    [("importance_sampling", {}), ("ppo", {}), ("ppo", {"clip_low_threshold": 0.5, "clip_high_threshold": 1.5}),
     ("cispo", {}), ("dro", {"beta": 0.3})],
)  # fmt: skip
def test_each_rl_loss_equals_its_formula(tiny_model_dir: Path, name: str, config: dict[str, float]) -> None:
    trainer = _trainer(tiny_model_dir)
    data = _data(seed=1)
    result = trainer.forward(ForwardOp(op="forward_backward", loss_fn=name, loss_fn_config=config or None, data=data))  # type: ignore[arg-type]
    expected = sum(_formula(name, out["logprobs"], d, config)
                   for d, out in zip(data, result.loss_fn_outputs, strict=True))  # fmt: skip
    assert result.metrics["loss:sum"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.params)


def test_gradients_accumulate_across_calls_until_optim_step(tiny_model_dir: Path) -> None:
    data = _data()
    once = _trainer(tiny_model_dir)
    once.forward(ForwardOp(op="forward_backward", loss_fn="cross_entropy", data=data))
    split = _trainer(tiny_model_dir)
    split.forward(ForwardOp(op="forward_backward", loss_fn="cross_entropy", data=data[:1]))
    split.forward(ForwardOp(op="forward_backward", loss_fn="cross_entropy", data=data[1:]))
    for a, b in zip(once.params, split.params, strict=True):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-6)  # type: ignore[arg-type]
    before = once.forward(ForwardOp(op="forward", loss_fn="cross_entropy", data=data)).metrics["loss:sum"]
    once.optim_step(OptimStepOp(learning_rate=1e-2))
    assert all(p.grad is None for p in once.params)
    after = once.forward(ForwardOp(op="forward", loss_fn="cross_entropy", data=data)).metrics["loss:sum"]
    assert after < before


def test_save_and_load_state_continue_with_identical_losses(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = _data()
    step = OptimStepOp(learning_rate=1e-2)
    fb = ForwardOp(op="forward_backward", loss_fn="cross_entropy", data=data)
    first = _trainer(tiny_model_dir)
    first.forward(fb)
    first.optim_step(step)
    first.save(tmp_path / "ckpt", optimizer=True, model_id="m1", tinker_path="tinker://m1/weights/a")
    continued = [
        first.forward(fb).metrics["loss:sum"],
        first.optim_step(step) and first.forward(fb).metrics["loss:sum"],
    ]

    second = _trainer(tiny_model_dir)
    second.load(tmp_path / "ckpt", optimizer=True)
    loaded = [
        second.forward(fb).metrics["loss:sum"],
        second.optim_step(step) and second.forward(fb).metrics["loss:sum"],
    ]
    assert loaded == pytest.approx(continued, rel=1e-5)

    third = _trainer(tiny_model_dir)
    third.load(tmp_path / "ckpt", optimizer=False)  # weights only: a fresh optimizer steps differently
    third.forward(fb)
    third.optim_step(step)
    assert third.forward(fb).metrics["loss:sum"] != pytest.approx(loaded[1], rel=1e-6)

    with pytest.raises(CheckpointError, match="rank"):
        _trainer(tiny_model_dir, rank=8).load(tmp_path / "ckpt", optimizer=False)
    first.save(tmp_path / "sampler", optimizer=False, model_id="m1", tinker_path="tinker://m1/sampler_weights/a")
    with pytest.raises(CheckpointError, match="optimizer"):
        _trainer(tiny_model_dir).load(tmp_path / "sampler", optimizer=True)


def _shared(model_dir: Path, n: int) -> list[TinkerTrainer]:
    """`n` clients on one loaded base, each with its own adapter (as a hosting job holds them)."""
    config = TrainConfig(model_name=str(model_dir))
    base, _tokenizer, engine = load_base_model(config, torch.device("cpu"))
    model, trainers = None, []
    for i in range(n):
        model = add_client_adapter(model if model is not None else base, f"c{i}", rank=4 + 4 * i, seed=i,
                                   unembed=i % 2 == 0)  # fmt: skip
        trainers.append(TinkerTrainer(model, engine=engine, base=str(model_dir), rank=4 + 4 * i, adapter=f"c{i}",
                                      fast=trainers[0].fast if trainers else None))  # fmt: skip
    return trainers


@pytest.mark.parametrize("kind", ["forward", "forward_backward"])
def test_calls_run_together_equal_the_calls_run_one_by_one(tiny_model_dir: Path, kind: str) -> None:
    ops = [ForwardOp(op=kind, loss_fn="cross_entropy", data=_data(2, seed=5)),  # type: ignore[arg-type]
           ForwardOp(op=kind, loss_fn="importance_sampling", data=_data(3, seed=6))]  # type: ignore[arg-type]  # fmt: skip
    alone = _shared(tiny_model_dir, 2)
    for trainer in alone:  # make the adapters differ from the base (LoRA B starts at zero)
        trainer.forward(ForwardOp(op="forward_backward", loss_fn="cross_entropy", data=_data(1, seed=7)))
        trainer.optim_step(OptimStepOp(learning_rate=0.05))
    together = _shared(tiny_model_dir, 2)
    for trainer in together:
        trainer.forward(ForwardOp(op="forward_backward", loss_fn="cross_entropy", data=_data(1, seed=7)))
        trainer.optim_step(OptimStepOp(learning_rate=0.05))
    expected = [trainer.forward(op) for trainer, op in zip(alone, ops, strict=True)]
    got = forward_together(list(zip(together, ops, strict=True)))
    for want, have in zip(expected, got, strict=True):
        assert have.metrics["loss:sum"] == pytest.approx(want.metrics["loss:sum"], rel=1e-5)
        for w, h in zip(want.loss_fn_outputs, have.loss_fn_outputs, strict=True):
            assert h["logprobs"] == pytest.approx(w["logprobs"], abs=1e-5)
    if kind == "forward_backward":
        for a, b in zip(alone, together, strict=True):
            for p, q in zip(a.params, b.params, strict=True):
                assert (p.grad is None) == (q.grad is None)
                if p.grad is not None:
                    assert torch.allclose(p.grad, q.grad, atol=1e-5)  # type: ignore[arg-type]
