"""Fast engine against the reference engine at the seed's defaults, on a GPU in bf16 (or anywhere).

    python -m bench.gpu_parity [--shape qwen2.5-0.5b] [--dtype bfloat16] [--loop-steps 6] [--json OUT]

Two checks, each printed as ``PASS``/``FAIL`` with the numbers it judged (exit code 1 on any FAIL):

1. One step, same weights, same sequences: the fast step (packed, varlen attention, loss on the
   loss positions only; Liger's fused loss where installed) against the reference step (padded,
   full logits). The model is a random-weight one of `--shape` with the LoRA of a default
   `TrainConfig` (r=8, alpha 32, all-linear, lm_head + embed_tokens trained in full, fp32 trained
   parameters over a bf16 base) except for dropout, which is 0: the two engines draw their dropout
   masks in different orders, so with dropout they could not agree. LoRA's B matrices start as
   small random values rather than PEFT's zeros, so that every A matrix gets a gradient too.
   Judged: the first-step loss (relative difference <= --loss-rtol) and every trained tensor's
   gradient (cosine similarity >= --grad-cos and relative norm error |g_fast - g_ref| / |g_ref|
   <= --grad-rtol, per tensor; plus the cosine of all LoRA gradients together >= --all-cos).
   bf16 keeps 8 bits of mantissa and the engines sum in different orders (and use different
   kernels), so the limits leave room for rounding: on the CPU in bf16 the engines agree to a
   cosine of 0.9999 and 1 % relative error per tensor. A wrong mask, a missed loss position or a
   dropped scale moves gradients far more (the loss of a random-weight model stays near
   ln(vocab) whatever attention does, so the gradients are the sharper test).

2. A few optimizer steps through `worker.training.loop.train_loop`: the speed-ups forced on (on CUDA:
   static bucketed shapes, compiled layers, whole-step CUDA graphs, capturable AdamW, each checked
   against the eager step on its first compiled step and first replay) against the eager
   path (``compile=False, cuda_graphs=False``) from the same weights on the same batches (of one
   shape, so one compilation). Judged: every step's loss (relative difference <= --loop-rtol), the
   LoRA weights' changes over the run (cosine of all of them together >= --update-cos: AdamW's
   first steps move each weight by about the learning rate in the direction of its gradient's
   sign, and near-zero gradients may flip it), and on CUDA that the default path ran without
   falling back and without a check disagreeing (no warning event).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.train import SHAPES, Shape, build_model, synthetic_examples

BATCH = 4


@dataclass
class LoopRun:
    losses: list[float]
    updates: dict[str, Any]  # trained tensor -> its change over the run (fp32, on the device)
    events: list[str]


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class GradDiff:
    name: str
    cosine: float
    rel_error: float  # |fast - ref| / |ref|
    ref_norm: float


def short_name(name: str) -> str:
    """``base_model.model.model.layers.3.mlp.up_proj.lora_A.default.weight`` -> ``layers.3.mlp.up_proj.lora_A``."""
    return name.removeprefix("base_model.model.").removeprefix("model.").replace(".default.weight", "")


def compare_grads(ref: dict[str, Any], fast: dict[str, Any]) -> list[GradDiff]:
    """Per-tensor agreement of two gradient dicts (same names); a pair of zero tensors agrees."""
    import torch

    if ref.keys() != fast.keys():
        raise ValueError(f"different trained tensors: {sorted(ref.keys() ^ fast.keys())[:5]}")
    out = []
    for name in sorted(ref):
        a, b = ref[name].double().flatten(), fast[name].double().flatten()
        na, nb = float(a.norm()), float(b.norm())
        if na == 0.0 and nb == 0.0:
            out.append(GradDiff(short_name(name), 1.0, 0.0, 0.0))
            continue
        cosine = float(torch.dot(a, b)) / (na * nb) if na > 0 and nb > 0 else 0.0
        rel = float((a - b).norm()) / na if na > 0 else math.inf
        out.append(GradDiff(short_name(name), cosine, rel, na))
    return out


def overall_cosine(ref: dict[str, Any], fast: dict[str, Any], names: Sequence[str]) -> float:
    import torch

    a = torch.cat([ref[n].double().flatten() for n in names])
    b = torch.cat([fast[n].double().flatten() for n in names])
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


def judge_grads(diffs: Sequence[GradDiff], *, min_cos: float, max_rel: float, label: str) -> Check:
    bad = [d for d in diffs if d.cosine < min_cos or d.rel_error > max_rel]
    worst_cos = min(diffs, key=lambda d: d.cosine)
    worst_rel = max(diffs, key=lambda d: d.rel_error)
    detail = (
        f"{len(diffs)} tensors; min cosine {worst_cos.cosine:.5f} ({worst_cos.name}), max rel error "
        f"{worst_rel.rel_error:.4f} ({worst_rel.name}); limits cos >= {min_cos}, rel <= {max_rel}"
    )
    if bad:
        detail += f"; {len(bad)} outside, e.g. " + ", ".join(
            f"{d.name} cos={d.cosine:.4f} rel={d.rel_error:.3f}" for d in bad[:3]
        )
    return Check(label, not bad, detail)


def parity_config(dtype: str) -> Any:
    from shared.config import TrainConfig

    return TrainConfig(lora_dropout=0.0, model_load_torch_dtype=dtype)  # type: ignore[arg-type]


def perturb_lora_b(model: Any, seed: int, std: float = 0.02) -> None:
    """Give every LoRA B matrix small random values (PEFT starts them at zero: A would get no gradient)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def one_step(model: Any, kind: str, device: Any, examples: Sequence[Any]) -> tuple[float, dict[str, Any], str]:
    """The step's loss, every trained tensor's gradient (fp32 copies), and the loss implementation used."""
    from worker.training.forward_backward import FastStep, make_step_fn

    model.train()
    step = make_step_fn(model, kind=kind, device=device)  # type: ignore[arg-type]
    out = step(examples)
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    loss_name = step.loss_name if isinstance(step, FastStep) else "full logits"
    model.zero_grad(set_to_none=True)
    return float(out.loss), grads, loss_name


def loop_examples(shape: Shape, steps: int, seed: int) -> list[Any]:
    """`steps` batches of equal shape (same lengths and loss counts, new tokens): one static bucket."""
    from worker.training.example import IGNORE_INDEX, Example

    rng = random.Random(seed)
    lengths = [193, 309, 463, 579]  # ~386 on average, as the benchmark's conversations
    examples = []
    for _ in range(steps):
        for length in rng.sample(lengths, len(lengths)):
            ids = [rng.randrange(3, shape.vocab) for _ in range(length)]
            prompt = length // 2
            examples.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return examples


def loop_run(
    shape: Shape, device: Any, cfg: Any, state: dict[str, Any], examples: Sequence[Any], *, default: bool, seed: int
) -> LoopRun:
    from shared.events import EventPayload, event_type
    from worker.training.loop import LoopPlan, train_loop
    from worker.training.run_io import LocalControl

    model = build_model(shape, "fast", device, cfg, seed)
    model.load_state_dict(state)
    events: list[str] = []

    def on_event(event: EventPayload, message: str) -> None:
        events.append(f"{event_type(event)}: {message}")

    before = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    # On CUDA both speed-ups, forced: a few steps would never repay them by the job's own plan (speedups), and
    # this check is where they are seen to train like the eager step. On a CPU (dry run): the CPU default.
    speedups = (True if device.type == "cuda" else None) if default else False
    plan = LoopPlan(epochs=1, batch_size=BATCH, learning_rate=cfg.learning_rate, seed=seed, log_every=1,
                    shuffle=False, compile=speedups, cuda_graphs=speedups)  # fmt: skip
    result = train_loop(model, examples, plan, device=device, engine="fast", control=LocalControl(on_event=on_event))
    updates = {n: p.detach().float() - before[n] for n, p in model.named_parameters() if p.requires_grad}
    return LoopRun([loss for _, loss in result.logged_losses], updates, events)


def run(args: argparse.Namespace) -> tuple[list[Check], dict[str, Any]]:
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shape = SHAPES[args.shape]
    cfg = parity_config(args.dtype)
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    checks: list[Check] = []

    started = time.perf_counter()
    ref_model = build_model(shape, "reference", device, cfg, args.seed)
    perturb_lora_b(ref_model, args.seed)
    state = {k: v.detach().clone() for k, v in ref_model.state_dict().items()}
    examples = synthetic_examples(BATCH, vocab=shape.vocab, mean_len=386, max_len=1024, seed=args.seed)
    ref_loss, ref_grads, _ = one_step(ref_model, "reference", device, examples)
    del ref_model
    fast_model = build_model(shape, "fast", device, cfg, args.seed)
    fast_model.load_state_dict(state)
    fast_loss, fast_grads, loss_name = one_step(fast_model, "fast", device, examples)
    del fast_model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    rel = abs(fast_loss - ref_loss) / abs(ref_loss)
    lengths = [len(e.input_ids) for e in examples]
    checks.append(
        Check(
            "first-step loss",
            rel <= args.loss_rtol,
            f"reference {ref_loss:.6f}, fast {fast_loss:.6f} ({loss_name} loss), rel diff {rel:.2e} "
            f"<= {args.loss_rtol}; sequences {lengths}",
        )
    )
    diffs = compare_grads(ref_grads, fast_grads)
    lora = [d for d in diffs if "lora_" in d.name]
    full = [d for d in diffs if "lora_" not in d.name]
    checks.append(judge_grads(lora, min_cos=args.grad_cos, max_rel=args.grad_rtol, label="LoRA gradients"))
    if full:
        checks.append(
            judge_grads(full, min_cos=args.grad_cos, max_rel=args.grad_rtol, label="modules_to_save gradients")
        )
    together = overall_cosine(ref_grads, fast_grads, [n for n in sorted(ref_grads) if "lora_" in n])
    checks.append(Check("all LoRA gradients", together >= args.all_cos, f"cosine {together:.6f} >= {args.all_cos}"))
    report["step_seconds"] = time.perf_counter() - started
    report["grads"] = [asdict(d) for d in sorted(diffs, key=lambda d: d.cosine)[:10]]
    del ref_grads, fast_grads

    if args.loop_steps > 0:
        started = time.perf_counter()
        batches = loop_examples(shape, args.loop_steps, args.seed)
        default = loop_run(shape, device, cfg, state, batches, default=True, seed=args.seed)
        default_s = time.perf_counter() - started
        eager = loop_run(shape, device, cfg, state, batches, default=False, seed=args.seed)
        worst = max(abs(a - b) / abs(b) for a, b in zip(default.losses, eager.losses, strict=True))
        path = "static shapes + compile + CUDA graphs" if device.type == "cuda" else "eager (CPU default)"
        checks.append(
            Check(
                "default vs eager loop losses",
                worst <= args.loop_rtol and len(default.losses) == args.loop_steps,
                f"{args.loop_steps} steps, default path [{path}] "
                f"{', '.join(f'{x:.5f}' for x in default.losses)}; eager "
                f"{', '.join(f'{x:.5f}' for x in eager.losses)}; max rel diff {worst:.2e} <= {args.loop_rtol}; "
                f"default path took {default_s:.1f} s",
            )
        )
        # Random weights keep the loss near ln(vocab) whatever attention does; the updates show more.
        lora_names = [n for n in sorted(default.updates) if "lora_" in n]
        agreement = overall_cosine(eager.updates, default.updates, lora_names)
        checks.append(
            Check(
                "default vs eager loop updates",
                agreement >= args.update_cos,
                f"cosine of all LoRA weight changes after {args.loop_steps} steps {agreement:.5f} >= {args.update_cos}",
            )
        )
        if device.type == "cuda":
            events = default.events
            checks.append(Check("default path without fallback", not events, "; ".join(events) or "no warning events"))
        report["loop"] = {"default": default.losses, "eager": eager.losses, "events": default.events + eager.events}
        report["loop_seconds"] = time.perf_counter() - started
    return checks, report


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_parity", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16", help="base weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loop-steps", type=int, default=6, help="optimizer steps of the loop check (0: skip it)")
    parser.add_argument("--loss-rtol", type=float, default=5e-3)
    parser.add_argument("--grad-cos", type=float, default=0.99)
    parser.add_argument("--grad-rtol", type=float, default=0.05)
    parser.add_argument("--all-cos", type=float, default=0.999)
    parser.add_argument("--loop-rtol", type=float, default=1e-2)
    parser.add_argument("--update-cos", type=float, default=0.9)
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    checks, report = run(args)
    for check in checks:
        print(f"{'PASS' if check.ok else 'FAIL'}  {check.name}: {check.detail}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"checks": [asdict(c) for c in checks], **report}, indent=2))
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
