"""Whether compiling and capturing pay for this job, decided before step one from its steps and shapes.

Both speed-ups cost time before they save any. A CUDA graph of a step shape costs about one step to
capture (after an eager warm-up step that runs anyway) and then saves the host's kernel-launch time
on every replay: it pays for a shape that comes at least `MIN_GRAPH_STEPS` times. Compiling the
decoder layers costs tens of seconds (seconds when torch's on-disk caches already hold this model's
graphs, see `compile_cache_key`) and saves a fraction of the device time of every step (and the
launches it fuses where steps are not captured): it pays only for long jobs or large steps. The
seed's default job -- 200 chats, 3 epochs, batch 4, 150 steps -- gets graphs and no compile.

The loop counts the (tokens, loss rows) bucket of every step of the job (host-side arithmetic on the
examples' lengths, no tokens touched), so the decision, and which shapes get a graph, rests on what
the job will actually run. The figures below are estimates for a Hopper-class GPU; `bench.train`
measures the real ones, and `SpeedupPlan.reasons` says which numbers a decision rested on.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from worker.training.example import Example
from worker.training.forward_backward import decoder_layers
from worker.training.graph_cache import Key
from worker.training.packing import bucket_size, count_loss_tokens

MIN_GRAPH_STEPS = 3  # a shape's steps for its graph to pay: 1 warm-up, 1 capture, then replays
LAUNCH_S_PER_LAYER = 5e-3  # host time of one decoder layer's eager step (~360 aten calls at ~15 us)
LAUNCH_S_FIXED = 20e-3  # the rest of an eager step: embedding, head, loss, clipping, AdamW
COMPILE_COLD_S = 60.0  # compiling forward + backward of the decoder layers, nothing cached
COMPILE_CACHED_S = 10.0  # the same from torch's on-disk FX graph / AOTAutograd / Triton caches
COMPILE_DEVICE_GAIN = 0.2  # device time a compiled (fused) layer saves
COMPILE_LAUNCH_GAIN = 0.5  # launches a compiled layer saves where the step is not captured
DEVICE_FLOPS = 4e14  # sustained bf16 matmul throughput assumed for the estimate (half a Hopper's peak)
_MARKERS = "lora-server-compiled"  # beside torch's caches: one empty file per model shape compiled there


@dataclass(frozen=True, slots=True)
class SpeedupPlan:
    compile: bool
    cuda_graphs: bool
    expected: Counter[Key] = field(default_factory=Counter)  # steps of each step shape over the job
    reasons: tuple[str, ...] = ()

    def describe(self) -> str:
        path = " + ".join(name for name, on in (("compiled layers", self.compile), ("CUDA graphs", self.cuda_graphs))
                          if on) or "eager steps"  # fmt: skip
        return f"{path}: " + "; ".join(self.reasons)


def step_shapes(examples: Sequence[Any], batches: Sequence[Sequence[int]]) -> Counter[Key]:
    """How many steps of each static (tokens, loss rows) bucket `batches` (indices into `examples`) make."""
    tokens = [len(e.input_ids) for e in examples]
    rows = [count_loss_tokens(e) for e in examples]
    return Counter((bucket_size(sum(tokens[i] for i in batch)), bucket_size(sum(rows[i] for i in batch)))
                   for batch in batches)  # fmt: skip


def plan_speedups(
    model: nn.Module,
    examples: Sequence[Example],
    batches: Sequence[Sequence[int]],
    *,
    device: torch.device,
    compile: bool | None,
    cuda_graphs: bool | None,
    compile_cached: bool = False,
) -> SpeedupPlan:
    """The speed-ups for a job whose steps take `batches` (every step of the job, in order).

    `compile` / `cuda_graphs`: the caller's choice (True or False is obeyed; None is decided here).
    `compile_cached`: torch's on-disk caches hold this model shape's compiled graphs (`compile_cache_key`).
    """
    shapes = step_shapes(examples, batches)
    steps = len(batches)
    if device.type != "cuda":
        on = bool(compile)  # CPU: only when asked (a test, a benchmark); there are no CUDA graphs
        return SpeedupPlan(on, False, shapes, ("on a CPU, steps are eager unless compile is asked for",))
    layers = max(1, len(decoder_layers(model)))
    launch_s = LAUNCH_S_PER_LAYER * layers + LAUNCH_S_FIXED
    reasons: list[str] = []
    if cuda_graphs is None:
        paying = {key: n for key, n in shapes.items() if n >= MIN_GRAPH_STEPS}
        replays = sum(n - 2 for n in paying.values())
        cuda_graphs = bool(paying)
        reasons.append(
            f"{len(paying)} of {len(shapes)} step shapes come {MIN_GRAPH_STEPS}+ times ({sum(paying.values())} of "
            f"{steps} steps): graphs save ~{replays * launch_s:.0f} s of kernel launches"
            if paying else f"no step shape of {len(shapes)} comes {MIN_GRAPH_STEPS}+ times: a capture would not pay"
        )  # fmt: skip
    else:
        reasons.append(f"CUDA graphs {'on' if cuda_graphs else 'off'} as configured")
    if compile is None:
        mean_tokens = sum(tokens * n for (tokens, _), n in shapes.items()) / max(steps, 1)
        device_s = 4 * _count_params(model) * mean_tokens / DEVICE_FLOPS  # forward + input gradients
        per_step = COMPILE_DEVICE_GAIN * device_s + (0.0 if cuda_graphs else COMPILE_LAUNCH_GAIN * launch_s)
        cost = COMPILE_CACHED_S if compile_cached else COMPILE_COLD_S
        compile = steps * per_step > cost
        where = "cached" if compile_cached else "cold"
        reasons.append(
            f"compiling ({where}, ~{cost:.0f} s) saves ~{per_step * 1e3:.1f} ms a step: "
            + (f"pays over {steps} steps" if compile else
               f"{steps} steps save ~{steps * per_step:.1f} s, it pays from ~{math.ceil(cost / per_step):,} steps")
        )  # fmt: skip
    else:
        reasons.append(f"compile {'on' if compile else 'off'} as configured")
    return SpeedupPlan(bool(compile), bool(cuda_graphs), shapes, tuple(reasons))


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- the on-disk compile cache


def compile_cache_dir() -> Path | None:
    """Where torch's inductor caches live, when the worker put them somewhere shared (the volume)."""
    value = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    return Path(value) if value else None


def compile_cache_key(model: nn.Module) -> str:
    """What a compiled decoder layer's graphs depend on: the model's shape, dtypes, adapter layout and torch."""
    config = getattr(model, "config", None)
    shape = config.to_dict() if config is not None and hasattr(config, "to_dict") else {}
    layer = {name: (tuple(p.shape), str(p.dtype), p.requires_grad) for name, p in model.named_parameters()
             if ".layers.0." in name}  # fmt: skip
    blob = json.dumps({"torch": torch.__version__, "config": shape, "layer": layer}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def compile_cached(key: str) -> bool:
    folder = compile_cache_dir()
    return folder is not None and (folder / _MARKERS / key).exists()


def mark_compiled(key: str) -> None:
    """Record that this model shape compiled (and passed its check) into the shared cache."""
    folder = compile_cache_dir()
    if folder is None:
        return
    try:
        (folder / _MARKERS).mkdir(parents=True, exist_ok=True)
        (folder / _MARKERS / key).touch()
    except OSError:  # a read-only or full volume costs the next job a cold estimate, nothing more
        pass
