"""Training throughput at the seed's defaults: our engines against plain TRL on the same data, model and seed.

    python -m bench.train --shape tiny|tiny-deep|qwen2.5-0.5b --batch-size 4 --batches 10 \\
        --warmup-epochs 2 --timed-epochs 2 --engines fast,reference,trl [--no-modules-to-save] \\
        [--no-compile] [--no-cuda-graphs] [--json OUT] \\
        [--tta-records 200 --tta-epochs 3 --tta-batch-size 4 | --no-time-to-adapter]

What runs is what a job runs: a random-weight model of the shape (throughput depends on shape, not
values), the LoRA of a default `TrainConfig` applied by `worker.training.model_loading.prepare_model` (r=8,
alpha 32, dropout 0.05, all-linear, lm_head + embed_tokens trained in full; `--no-modules-to-save`
drops the latter), bf16 on a GPU, and `worker.training.loop.train_loop` with its defaults (on CUDA the fast
engine compiles and captures whole steps; `--no-compile` / `--no-cuda-graphs` turn those off for
every fast row, and an engine written ``fast:no-compile`` or ``fast:no-graphs`` or ``fast:eager``
turns them off for that row alone, so one table shows what each piece pays). TRL is plain
`SFTTrainer` on padded batches over the same LoRA configuration (modules_to_save included),
without our dtype handling.

Data: `--batches` x `--batch-size` synthetic pre-tokenized chat examples (log-normal lengths, loss on
the latter part), taken in order. Every engine runs `--warmup-epochs` untimed passes over them
(the fast engine's static path compiles a shape the first time it sees it and captures it the
second), then `--timed-epochs` timed ones. Each engine runs in its own process (clean peak memory).

After the steady-state table, the time-to-adapter rows (`bench.time_to_adapter`): the seed's default job
(200 chats, 3 epochs, batch 4; `--tta-*` make it smaller on a CPU) from job claimed to adapter saved, cold
and warm, our job path against TRL. Both tables end with the issue's targets, MET or MISSED.

FLOPs are counted from what each engine computes (`step_work`, `step_flops`; printed with the
table): the fast engine runs the LM head only on positions with a label (and, on its static path,
on bucket filler rows too), the reference engine and TRL run the whole padded batch through every
layer and the head. "MFU" is from the engine's own FLOPs; "useful MFU" counts the same useful work
for every engine (real tokens, head on loss positions only), so it compares engines fairly.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bench import targets, time_to_adapter
from bench.child import run_child, terminated
from tests.fixtures.tiny_model import SHAPES as MODEL_SHAPES

ENGINES = ("fast", "reference", "trl")
FAST_OPTIONS = {"no-compile": ("compile",), "no-graphs": ("cuda_graphs",), "eager": ("compile", "cuda_graphs")}
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}  # dense bf16 spec, no sparsity
CHILD_RESERVE_S = 25.0  # with --time-budget: kept back for each row still to run (--row-reserve)


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int
    vocab: int

    @classmethod
    def of(cls, dims: dict[str, Any]) -> Shape:
        return cls(
            hidden=dims["hidden_size"],
            layers=dims["num_hidden_layers"],
            heads=dims["num_attention_heads"],
            kv_heads=dims["num_key_value_heads"],
            mlp=dims["intermediate_size"],
            vocab=dims["vocab_size"],
        )

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of one decoder layer's linears: q, k, v, o, gate, up, down."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, m = self.hidden, self.mlp
        return [(h, q), (h, kv), (h, kv), (q, h), (h, m), (h, m), (m, h)]

    def decoder_params(self) -> int:
        """Frozen matmul weights a token goes through in the decoder (the LM head apart)."""
        return self.layers * sum(i * o for i, o in self.linears())

    def lora_params(self, rank: int) -> int:
        """LoRA A and B weights on every decoder linear (PEFT's all-linear leaves the LM head out)."""
        return self.layers * sum(rank * (i + o) for i, o in self.linears())


SHAPES = {
    "tiny": Shape(hidden=128, layers=4, heads=4, kv_heads=2, mlp=256, vocab=2048),
    # 0.5B's depth and module count with tiny widths: shows per-step framework overhead on a CPU
    "tiny-deep": Shape(hidden=64, layers=24, heads=4, kv_heads=2, mlp=128, vocab=2048),
    "qwen2.5-0.5b": Shape.of(MODEL_SHAPES["qwen2.5-0.5b"]),
}


@dataclass(frozen=True)
class StepWork:
    """What one optimizer step pushes through the model."""

    positions: int  # token positions through every decoder layer (padding and filler included)
    attention_pairs: int  # causal (query, key) pairs, summed over the sequences attention sees
    head_rows: int  # rows through the LM head


FLOP_FORMULAS = (
    "FLOPs per step from its work (P positions, A causal attention pairs, R LM-head rows):",
    "  4*N_dec*P       decoder: frozen weights, forward 2N + input gradient 2N per position",
    "  + 6*N_lora*P    LoRA: forward, input and weight gradients",
    "  + 12*L*H*A      attention: QK^T and AV forward 4*H per pair and layer, backward twice that",
    "  + 6*V*H*R       LM head trained in full (modules_to_save; 4*V*H*R when it is frozen)",
    "  fast:  P = real tokens, A = sum n(n+1)/2, R = loss tokens; on the static path P and R are rounded",
    "         up to their buckets and the filler segment attends to itself",
    "  reference, trl: the padded batch, P = R = batch*W, A = batch*W(W+1)/2 (W: longest in the batch)",
    "  useful (same for every engine): P = real tokens, A = sum n(n+1)/2, R = loss tokens",
    "  MFU = FLOPs / time / peak dense bf16 (989 TFLOP/s on H100 and H200)",
)


def step_work(lengths: Sequence[int], loss_tokens: int, *, engine: str, static: bool = False) -> StepWork:
    """The work one step does for sequences of `lengths` with `loss_tokens` labels to predict.

    `engine`: "fast", "reference", "trl" or "useful" (the work every engine needs; see FLOP_FORMULAS).
    """
    if engine in ("reference", "trl"):
        width = max(lengths)
        return StepWork(len(lengths) * width, len(lengths) * width * (width + 1) // 2, len(lengths) * width)
    pairs = sum(n * (n + 1) // 2 for n in lengths)
    tokens = sum(lengths)
    if engine == "useful" or (engine == "fast" and not static):
        return StepWork(tokens, pairs, loss_tokens)
    if engine != "fast":
        raise ValueError(f"unknown engine {engine!r}")
    from worker.training.packing import bucket_size

    positions = bucket_size(tokens)
    filler = positions - tokens
    return StepWork(positions, pairs + filler * (filler + 1) // 2, bucket_size(loss_tokens))


def step_flops(shape: Shape, work: StepWork, *, lora_rank: int, head_trained: bool) -> float:
    decoder = 4 * shape.decoder_params() * work.positions
    lora = 6 * shape.lora_params(lora_rank) * work.positions
    attention = 12 * shape.layers * shape.heads * shape.head_dim * work.attention_pairs
    head = (6 if head_trained else 4) * shape.vocab * shape.hidden * work.head_rows
    return float(decoder + lora + attention + head)


def synthetic_examples(n: int, *, vocab: int, mean_len: int, max_len: int, seed: int) -> list[Any]:
    """Chat-like pre-tokenized examples: log-normal lengths (median ~0.78 x mean), loss on the end."""
    from worker.training.example import IGNORE_INDEX, Example

    rng = random.Random(seed)
    sigma = 0.71  # median 300 for mean 386, as in docs/performance.md
    mu = math.log(mean_len) - sigma**2 / 2
    examples = []
    for _ in range(n):
        length = max(8, min(max_len, round(rng.lognormvariate(mu, sigma))))
        prompt = round(length * rng.uniform(0.3, 0.7))
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        examples.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return examples


# --------------------------------------------------------------------------- one engine (child)


@dataclass(frozen=True)
class EngineSpec:
    """A table row: an engine, and for the fast one which speed pieces are forced off."""

    label: str
    engine: Literal["fast", "reference", "trl"]
    compile: bool | None  # None: the loop's default (on for CUDA)
    cuda_graphs: bool | None

    @classmethod
    def parse(cls, text: str, *, no_compile: bool = False, no_graphs: bool = False) -> EngineSpec:
        name, *options = text.strip().split(":")
        if name not in ENGINES:
            raise ValueError(f"unknown engine {name!r} (choose from {', '.join(ENGINES)})")
        off = {"compile": no_compile, "cuda_graphs": no_graphs}
        for option in options:
            if name != "fast" or option not in FAST_OPTIONS:
                raise ValueError(f"{text!r}: only fast takes options, one of {', '.join(FAST_OPTIONS)}")
            off.update(dict.fromkeys(FAST_OPTIONS[option], True))
        return cls(
            label=text.strip(),
            engine=name,  # type: ignore[arg-type]
            compile=False if off["compile"] else None,
            cuda_graphs=False if off["cuda_graphs"] else None,
        )


def train_config(args: argparse.Namespace) -> Any:
    """The seed's defaults, as every job gets them (modules_to_save dropped on request)."""
    from shared.config import TrainConfig

    return TrainConfig(lora_modules_to_save=[]) if args.no_modules_to_save else TrainConfig()


def build_model(shape: Shape, engine: str, device: Any, cfg: Any, seed: int) -> Any:
    """A random-weight Qwen2 of `shape` with LoRA applied as a job applies it.

    Our engines get `prepare_model` (LoRA, fp32 trained parameters, the embedding-output cast);
    TRL gets the same LoRA configuration and nothing else, as the seed handed it to `SFTTrainer`.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from worker.training.attention import engine_attn_implementation
    from worker.training.model_loading import apply_lora, prepare_model, resolve_dtype

    implementation, _ = engine_attn_implementation(
        "fast" if engine == "fast" else "reference", cfg.attn_implementation, device
    )
    config = Qwen2Config(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.mlp,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=32_768,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM._from_config(
            config, attn_implementation=implementation, dtype=resolve_dtype(cfg, device)
        )
    if engine == "trl":
        return apply_lora(model, cfg, None)
    return prepare_model(model, cfg)


def run_engine(args: argparse.Namespace, spec: EngineSpec) -> dict[str, Any]:
    import torch

    from bench.trl_baseline import peak_memory_bytes, run_trl_baseline
    from shared.events import EventPayload, event_type
    from worker.training.loop import LoopHooks, LoopPlan, StepInfo, train_loop
    from worker.training.run_io import LocalControl

    shape = SHAPES[args.shape]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    use_cuda = device.type == "cuda"
    cfg = train_config(args)
    examples = bench_examples(args)
    epochs = args.warmup_epochs + args.timed_epochs
    warmup_steps = args.warmup_epochs * args.batches
    model = build_model(shape, spec.engine, device, cfg, args.seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    events: list[str] = []
    static = False
    if spec.engine == "trl":
        result = run_trl_baseline(
            model,
            None,
            examples,
            epochs=epochs,
            batch_size=args.batch_size,
            learning_rate=cfg.learning_rate,
            seed=args.seed,
            warmup_steps=warmup_steps,
            shuffle=False,
        )
        result["warmup_s"] = None
    else:
        started = time.perf_counter()
        marks: dict[str, float] = {"start": started}  # reset after the warm-up steps
        timed_tokens = 0

        def on_step(info: StepInfo) -> None:
            nonlocal timed_tokens
            if info.step == warmup_steps:
                if use_cuda:
                    torch.cuda.synchronize()
                marks["start"] = time.perf_counter()
            elif info.step > warmup_steps:
                timed_tokens += info.num_tokens

        def on_event(event: EventPayload, message: str) -> None:
            events.append(f"{event_type(event)}: {message}")

        if use_cuda:
            torch.cuda.reset_peak_memory_stats()
        plan = LoopPlan(epochs=epochs, batch_size=args.batch_size, learning_rate=cfg.learning_rate, seed=args.seed,
                        log_every=10**9, shuffle=False, compile=spec.compile, cuda_graphs=spec.cuda_graphs)  # fmt: skip
        loop = train_loop(model, examples, plan, device=device, engine=spec.engine,
                          control=LocalControl(on_event=on_event), hooks=LoopHooks(on_step=on_step))  # fmt: skip
        elapsed = time.perf_counter() - marks["start"]  # train_loop synchronized before returning
        # The loop's own rule: the fast engine takes the static (bucketed) path when either piece is on.
        wants = [use_cuda if flag is None else flag for flag in (spec.compile, spec.cuda_graphs)]
        static = spec.engine == "fast" and (wants[0] or (wants[1] and use_cuda))
        result = {
            "steps": loop.steps_done - warmup_steps,
            "tokens": timed_tokens,
            "elapsed_s": elapsed,
            "warmup_s": marks["start"] - started,
            "tokens_per_second": timed_tokens / elapsed,
            "peak_memory_bytes": peak_memory_bytes(use_cuda),
            "final_loss": loop.final_loss,
        }
    engine_flops, useful_flops = timed_flops(args, cfg, spec.engine, static=static)
    result.update(
        engine=spec.label,
        device=torch.cuda.get_device_name(device) if use_cuda else "cpu",
        dtype=str(next(p for p in model.parameters() if not p.requires_grad).dtype).removeprefix("torch."),
        trainable_params=trainable,
        static_shapes=static,
        engine_flops=engine_flops,
        useful_flops=useful_flops,
        events=events,
    )
    return result


def bench_examples(args: argparse.Namespace) -> list[Any]:
    count = args.batches * args.batch_size
    vocab = SHAPES[args.shape].vocab
    return synthetic_examples(count, vocab=vocab, mean_len=args.mean_len, max_len=args.max_len, seed=args.seed)


def timed_flops(args: argparse.Namespace, cfg: Any, engine: str, *, static: bool) -> tuple[float, float]:
    """FLOPs of the timed steps: what `engine` computes, and the useful work every engine shares."""
    from worker.training.packing import count_loss_tokens

    shape, examples = SHAPES[args.shape], bench_examples(args)
    head_trained = "lm_head" in cfg.lora_modules_to_save
    totals = [0.0, 0.0]
    for start in range(0, len(examples), args.batch_size):
        batch = examples[start : start + args.batch_size]
        lengths = [len(e.input_ids) for e in batch]
        loss_tokens = sum(count_loss_tokens(e) for e in batch)
        for i, kind in enumerate((engine, "useful")):
            work = step_work(lengths, loss_tokens, engine=kind, static=static)
            totals[i] += step_flops(shape, work, lora_rank=cfg.lora_rank, head_trained=head_trained)
    return totals[0] * args.timed_epochs, totals[1] * args.timed_epochs


# --------------------------------------------------------------------------- driver (parent)


def _run_child(argv: Sequence[str], spec: EngineSpec, timeout: float | None) -> dict[str, Any]:
    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "bench.train", *argv, "--child", spec.label, "--child-out", str(out)]

    return run_child(command, spec.label, timeout)


def peak_flops(device: str, dtype: str) -> float | None:
    if dtype != "bfloat16":
        return None
    return next((flops for name, flops in PEAK_BF16_FLOPS.items() if name in device), None)


def add_rates(result: dict[str, Any]) -> None:
    """TFLOP/s and MFU (engine's own FLOPs and useful FLOPs) of a finished row."""
    elapsed = result["elapsed_s"]
    result["tflops_per_s"] = result["engine_flops"] / elapsed / 1e12
    peak = peak_flops(result["device"], result["dtype"])
    result["mfu"] = None if peak is None else result["engine_flops"] / elapsed / peak
    result["useful_mfu"] = None if peak is None else result["useful_flops"] / elapsed / peak


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def format_table(args: argparse.Namespace, results: list[dict[str, Any]]) -> str:
    cfg = train_config(args)
    device = next((r["device"] for r in results if "device" in r), "?")
    dtype = next((r["dtype"] for r in results if "dtype" in r), "?")
    saved = ", ".join(cfg.lora_modules_to_save) or "none"
    lines = [
        f"shape={args.shape} batch={args.batch_size} batches={args.batches} epochs={args.warmup_epochs} warm-up"
        f" + {args.timed_epochs} timed, mean_len={args.mean_len} max_len={args.max_len} seed={args.seed}"
        f" device={device} dtype={dtype}",
        f"seed defaults: LoRA r={cfg.lora_rank} alpha={cfg.lora_alpha} dropout={cfg.lora_dropout}"
        f" {cfg.lora_target_modules}, modules_to_save=[{saved}], lr={cfg.learning_rate}",
        *FLOP_FORMULAS,
    ]
    memory_kind = "peak GPU mem" if device not in ("cpu", "?") else "peak RSS"
    lines.append(
        f"{'engine':<26} {'tokens/s':>10} {memory_kind:>13} {'TFLOP/s':>8} {'MFU':>6} {'useful MFU':>10}"
        f" {'warm-up s':>9} {'final loss':>10}"
    )
    for r in results:
        if "error" in r:
            lines.append(f"{r['engine']:<26} ERROR {r['error'].splitlines()[0]}")
            continue
        warmup = "n/a" if r.get("warmup_s") is None else f"{r['warmup_s']:.1f}"
        loss = "n/a" if r.get("final_loss") is None else f"{r['final_loss']:.4f}"
        lines.append(
            f"{r['engine']:<26} {r['tokens_per_second']:>10,.0f} {r['peak_memory_bytes'] / 2**30:>9.2f} GiB"
            f" {r['tflops_per_s']:>8.3f} {_pct(r['mfu']):>6} {_pct(r['useful_mfu']):>10} {warmup:>9} {loss:>10}"
        )
    base = next((r for r in results if r["engine"] == "trl" and "error" not in r), None)
    for r in results:
        if base is None or r is base or "error" in r:
            continue
        speedup = r["tokens_per_second"] / base["tokens_per_second"]
        memory = r["peak_memory_bytes"] / base["peak_memory_bytes"]
        lines.append(f"{r['engine']} vs trl: {speedup:.2f}x tokens/s, {memory:.2f}x peak memory")
        if r["engine"] == "fast":
            lines += targets.steady_state_lines(r["device"], args.batch_size, speedup, memory, r.get("useful_mfu"))
    for r in results:
        for event in r.get("events", []):
            lines.append(f"{r['engine']}: {event}")
    return "\n".join(lines)


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.train", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--batches", type=int, default=10, help="distinct batches (one epoch)")
    parser.add_argument("--warmup-epochs", type=int, default=2, help="untimed passes over the batches first")
    parser.add_argument("--timed-epochs", type=int, default=2, help="timed passes after the warm-up")
    parser.add_argument("--mean-len", type=int, default=386)
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engines", default=",".join(ENGINES),
                        help="comma-separated rows: fast, reference, trl; fast:no-compile, fast:no-graphs, fast:eager")  # fmt: skip
    parser.add_argument("--no-modules-to-save", action="store_true", help="train LoRA only (no lm_head/embed_tokens)")
    parser.add_argument("--no-compile", action="store_true", help="fast engine: no torch.compile")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="fast engine: no whole-step CUDA graphs")
    parser.add_argument("--child-timeout", type=float, default=None, help="seconds each engine may take")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds for all rows: each may use what is left less --row-reserve for every row after it")  # fmt: skip
    parser.add_argument("--row-reserve", type=float, default=CHILD_RESERVE_S,
                        help="with --time-budget: seconds kept back for each row still to run (default %(default)s)")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    tta = parser.add_argument_group("time to adapter (bench.time_to_adapter), after the steady-state rows")
    tta.add_argument("--no-time-to-adapter", action="store_true", help="steady-state rows only")
    tta.add_argument("--tta-records", type=int, default=200, help="chats in the job (seed: 200)")
    tta.add_argument("--tta-epochs", type=int, default=3, help="the job's epochs (seed: 3)")
    tta.add_argument("--tta-batch-size", type=int, default=4, help="the job's batch size (seed: 4)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.batch_size, args.batches, args.timed_epochs) < 1 or args.warmup_epochs < 0:
        parser.error("--batch-size, --batches and --timed-epochs must be >= 1, --warmup-epochs >= 0")
    if min(args.tta_records, args.tta_epochs, args.tta_batch_size) < 1:
        parser.error("--tta-records, --tta-epochs and --tta-batch-size must be >= 1")
    return args


def tta_plan(args: argparse.Namespace) -> time_to_adapter.TtaPlan:
    """The time-to-adapter job: a model on disk with a tokenizer, so the fixture's shape nearest to `--shape`
    (its tiny one for both tiny shapes)."""
    shape = args.shape if args.shape in time_to_adapter.MODEL_SHAPES else "tiny"
    return time_to_adapter.TtaPlan(shape, args.tta_records, args.tta_epochs, args.tta_batch_size, seed=args.seed)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    try:
        specs = [
            EngineSpec.parse(e, no_compile=args.no_compile, no_graphs=args.no_cuda_graphs)
            for e in args.engines.split(",")
            if e.strip()
        ]
        child = (
            EngineSpec.parse(args.child, no_compile=args.no_compile, no_graphs=args.no_cuda_graphs)
            if args.child
            else None
        )
    except ValueError as exc:
        raise SystemExit(f"--engines: {exc}") from exc
    if child is not None:
        args.child_out.write_text(json.dumps(run_engine(args, child)))
        return 0
    signal.signal(signal.SIGTERM, terminated)
    results = []
    started = time.monotonic()
    for i, spec in enumerate(specs):
        timeout = args.child_timeout
        if args.time_budget is not None:  # what is left, less a minimum kept for each row still to run
            after = len(specs) - i - 1 + (0 if args.no_time_to_adapter else len(time_to_adapter.ENGINES))
            left = args.time_budget - (time.monotonic() - started) - args.row_reserve * after
            timeout = left if timeout is None else min(timeout, left)
        if timeout is not None and timeout <= 0:
            results.append({"engine": spec.label, "error": "not run: --time-budget spent"})
            continue
        result = _run_child(argv, spec, timeout)
        if "error" not in result:
            add_rates(result)
        results.append(result)
    print(format_table(args, results), flush=True)
    tta = None
    if not args.no_time_to_adapter:
        left = None if args.time_budget is None else args.time_budget - (time.monotonic() - started)
        tta = time_to_adapter.measure(tta_plan(args), time_budget=left, row_reserve=args.row_reserve)
        print(time_to_adapter.format_rows(tta), flush=True)
    if args.json:
        payload = {"args": {k: str(v) for k, v in vars(args).items()}, "flops": FLOP_FORMULAS, "results": results,
                   "time_to_adapter": tta}  # fmt: skip
        args.json.write_text(json.dumps(payload, indent=2))
    rows = results + (tta["results"] if tta else [])
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
