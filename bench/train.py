"""Training throughput: our engines against plain TRL on the same data, model and seed.

    python -m bench.train --shape tiny|tiny-deep|qwen2.5-0.5b --batch-size 4 --steps 10 \\
        --mean-len 386 --max-len 2048 --seed 0 --engines fast,reference,trl [--json OUT]

Random weights (throughput depends on shape, not values), synthetic pre-tokenized chat data
(log-normal lengths, loss on the latter part), LoRA r=8 alpha 32 dropout 0.05 all-linear. Each
engine runs in its own process (clean peak-memory numbers) on a fresh model with the same
seed, over the same batches in the same order: `--warmup` steps untimed, then `--steps` timed.
The fast and reference engines run through `worker.loop.train_loop`, the real worker loop.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

ENGINES = ("fast", "reference", "trl")
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}  # dense bf16, no sparsity


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int
    vocab: int

    def matmul_params(self) -> int:
        """Weights of every matmul a token goes through: the layers' linears and the LM head."""
        head_dim = self.hidden // self.heads
        attention = self.hidden * head_dim * (2 * self.heads + 2 * self.kv_heads)  # q, o, k, v
        return self.layers * (attention + 3 * self.hidden * self.mlp) + self.vocab * self.hidden


SHAPES = {
    "tiny": Shape(hidden=128, layers=4, heads=4, kv_heads=2, mlp=256, vocab=2048),
    # 0.5B's depth and module count with tiny widths: shows per-step framework overhead on a CPU
    "tiny-deep": Shape(hidden=64, layers=24, heads=4, kv_heads=2, mlp=128, vocab=2048),
    "qwen2.5-0.5b": Shape(hidden=896, layers=24, heads=14, kv_heads=2, mlp=4864, vocab=151_936),
}

FLOP_FORMULA = (
    "FLOPs/step = 4*N_matmul*tokens + 3*4*layers*hidden*sum_seq(n*(n+1)/2)  "
    "(frozen base: forward 2N + input-gradient 2N per token; causal attention fwd x3)"
)


def synthetic_examples(n: int, *, vocab: int, mean_len: int, max_len: int, seed: int) -> list[Any]:
    """Chat-like pre-tokenized examples: log-normal lengths (median ~0.78 x mean), loss on the end."""
    from worker.example import IGNORE_INDEX, Example

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


def step_flops(shape: Shape, lengths: Sequence[int]) -> float:
    attention_pairs = sum(n * (n + 1) / 2 for n in lengths)
    return 4 * shape.matmul_params() * sum(lengths) + 3 * 4 * shape.layers * shape.hidden * attention_pairs


# --------------------------------------------------------------------------- one engine (child)


def _build_model(shape: Shape, engine: str, device: Any, dtype: Any, seed: int) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from worker.engine import engine_attn_implementation

    implementation, _ = engine_attn_implementation("fast" if engine == "fast" else "reference", "sdpa", device)
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
        model = Qwen2ForCausalLM._from_config(config, attn_implementation=implementation, dtype=dtype)
    lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def run_engine(args: argparse.Namespace, engine: Literal["fast", "reference", "trl"]) -> dict[str, Any]:
    import torch

    from worker.loop import StepInfo, train_loop
    from worker.trl_baseline import peak_memory_bytes, run_trl_baseline

    shape = SHAPES[args.shape]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    use_cuda = device.type == "cuda"
    dtype = torch.bfloat16 if use_cuda and torch.cuda.is_bf16_supported() else torch.float32
    examples = _bench_examples(args)
    model = _build_model(shape, engine, device, dtype, args.seed)
    if engine == "trl":
        result = run_trl_baseline(
            model,
            None,
            examples,
            epochs=1,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            seed=args.seed,
            warmup_steps=args.warmup,
            shuffle=False,
        )
    else:
        marks: dict[str, float] = {"start": time.perf_counter()}  # reset after the warm-up steps, if any
        timed_tokens = 0

        def on_step(info: StepInfo) -> None:
            nonlocal timed_tokens
            if info.step == args.warmup:
                if use_cuda:
                    torch.cuda.synchronize()
                marks["start"] = time.perf_counter()
            elif info.step > args.warmup:
                timed_tokens += info.num_tokens

        if use_cuda:
            torch.cuda.reset_peak_memory_stats()
        loop = train_loop(
            model,
            examples,
            epochs=1,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            device=device,
            seed=args.seed,
            engine=engine,
            log_every=10**9,
            on_step=on_step,
            shuffle=False,
            compile=args.compile and engine == "fast",
        )
        elapsed = time.perf_counter() - marks["start"]  # train_loop synchronized before returning
        result = {
            "engine": engine,
            "steps": loop.steps_done - args.warmup,
            "tokens": timed_tokens,
            "elapsed_s": elapsed,
            "tokens_per_second": timed_tokens / elapsed,
            "peak_memory_bytes": peak_memory_bytes(use_cuda),
            "final_loss": loop.final_loss,
        }
    result["device"] = torch.cuda.get_device_name(device) if use_cuda else "cpu"
    result["dtype"] = str(dtype).removeprefix("torch.")
    return result


def _bench_examples(args: argparse.Namespace) -> list[Any]:
    count = (args.warmup + args.steps) * args.batch_size
    vocab = SHAPES[args.shape].vocab
    return synthetic_examples(count, vocab=vocab, mean_len=args.mean_len, max_len=args.max_len, seed=args.seed)


# --------------------------------------------------------------------------- driver (parent)


def _run_child(argv: Sequence[str], engine: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "bench.train", *argv, "--child", engine, "--child-out", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stdout + proc.stderr)[-3000:]
            return {"engine": engine, "error": f"exit {proc.returncode}: {tail}"}
        result: dict[str, Any] = json.loads(out.read_text())
        return result


def _mfu(args: argparse.Namespace, result: dict[str, Any]) -> float | None:
    device = result.get("device", "cpu")
    peak = next((flops for name, flops in PEAK_BF16_FLOPS.items() if name in device), None)
    if peak is None or result.get("dtype") != "bfloat16":
        return None
    lengths = [len(e.input_ids) for e in _bench_examples(args)[args.warmup * args.batch_size :]]
    return step_flops(SHAPES[args.shape], lengths) / result["elapsed_s"] / peak


def _print_table(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    device = next((r["device"] for r in results if "device" in r), "?")
    print(
        f"shape={args.shape} batch={args.batch_size} steps={args.steps} (+{args.warmup} warm-up) "
        f"mean_len={args.mean_len} max_len={args.max_len} seed={args.seed} device={device}"
    )
    print(FLOP_FORMULA)
    memory_kind = "peak GPU mem" if device != "cpu" else "peak RSS"
    print(f"{'engine':<10} {'tokens/s':>11} {memory_kind:>13} {'MFU':>7} {'final loss':>11}")
    for r in results:
        if "error" in r:
            print(f"{r['engine']:<10} ERROR {r['error']}")
            continue
        mfu = r.get("mfu")
        print(
            f"{r['engine']:<10} {r['tokens_per_second']:>11,.0f} {r['peak_memory_bytes'] / 2**30:>9.2f} GiB "
            f"{'n/a' if mfu is None else f'{mfu:.1%}':>7} {r['final_loss']:>11.4f}"
        )
    base = next((r for r in results if r["engine"] == "trl" and "error" not in r), None)
    if base is None:
        return
    for r in results:
        if r is base or "error" in r:
            continue
        print(
            f"{r['engine']} vs trl: {r['tokens_per_second'] / base['tokens_per_second']:.2f}x tokens/s, "
            f"{r['peak_memory_bytes'] / base['peak_memory_bytes']:.2f}x peak memory"
        )


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per engine")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    parser.add_argument("--mean-len", type=int, default=386)
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--compile", action="store_true", help="fast engine: torch.compile layers (CUDA)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    if args.child:
        args.child_out.write_text(json.dumps(run_engine(args, args.child)))
        return 0
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        raise SystemExit(f"unknown engines: {sorted(unknown)}")
    results = []
    for engine in engines:
        result = _run_child(argv, engine)
        if "error" not in result:
            result["mfu"] = _mfu(args, result)
        results.append(result)
    _print_table(args, results)
    if args.json:
        args.json.write_text(
            json.dumps(
                {"args": {k: str(v) for k, v in vars(args).items()}, "flops": FLOP_FORMULA, "results": results},
                indent=2,
            )
        )
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
