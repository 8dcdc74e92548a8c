"""The Tinker-compatible API's overhead and its scaling to two training clients, on this machine.

    python -m bench.tinker [--steps 50] [--batch 8] [--json OUT]

It builds the tiny random model locally (nothing is downloaded) and times the same supervised loop three ways:
  in-process   the engine's trainer (worker.tinker.trainer) called directly: forward_backward + optim_step
  one client   the `tinker` SDK against the whole service as `make run` starts it (`python -m cli serve`: one
               worker, embedded Redis, 127.0.0.1 only): the same steps through the protocol, futures and the
               hosting worker; the trainer in-process gets the same torch threads as that worker
  two clients  two SDK training clients on the same base (one hosting job: the base shared, their calls run
               together where both are ready), each running the loop in its own thread at once
and prints seconds per step, the protocol's overhead (one client / in-process) and the two clients' throughput
relative to one. It asserts nothing. Every process it started and every temp file is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.load import Config, build_tiny_model, one_command_service
from worker import cpu_budget

QUESTIONS = [f"Question number {i}: what is {i} plus {i}?" for i in range(64)]


def _examples(model_dir: Path, batch: int) -> list[tuple[list[int], list[float]]]:
    """(tokens, weights) of `batch` short chat conversations: the prompt unweighted, the answer weighted."""
    from transformers import AutoTokenizer

    tok: Any = AutoTokenizer.from_pretrained(str(model_dir))
    out = []
    for i in range(batch):
        prompt = tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i]}], add_generation_prompt=True,
                                         return_dict=True)["input_ids"]  # fmt: skip
        answer = tok.encode(f"It is {2 * i}, as {i} and {i} make {2 * i}.", add_special_tokens=False)
        tokens = list(prompt) + answer
        out.append((tokens, [0.0] * (len(prompt) - 1) + [1.0] * len(answer)))
    return out


def in_process(model_dir: Path, examples: list[tuple[list[int], list[float]]], steps: int, threads: int) -> float:
    """Seconds per step of the trainer called directly with `threads` torch threads (after one warm-up step)."""
    import torch

    from shared.config import TrainConfig
    from shared.tinker_ops import ForwardOp, OptimStepOp, TinkerDatum
    from worker.tinker.lora import apply_lora
    from worker.tinker.trainer import TinkerTrainer
    from worker.training.model_loading import load_base_model

    torch.set_num_threads(threads)
    base, _tok, engine = load_base_model(TrainConfig(model_name=str(model_dir)), torch.device("cpu"))
    trainer = TinkerTrainer(apply_lora(base, rank=16, seed=0), engine=engine, base=str(model_dir), rank=16)
    data = [TinkerDatum(tokens=t[:-1], target_tokens=t[1:], weights=w) for t, w in examples]
    op = ForwardOp(op="forward_backward", loss_fn="cross_entropy", data=data)
    step = OptimStepOp(learning_rate=1e-3)
    trainer.forward(op)
    trainer.optim_step(step)
    started = time.perf_counter()
    for _ in range(steps):
        trainer.forward(op)
        trainer.optim_step(step)
    return (time.perf_counter() - started) / steps


def sdk_loop(url: str, model_name: str, examples: list[tuple[list[int], list[float]]], steps: int) -> float:
    """Seconds per step through the SDK (after one warm-up step; the model's loading is not counted)."""
    import tinker
    from tinker import types

    client = tinker.ServiceClient(base_url=url, api_key="tml-bench")
    training = client.create_lora_training_client(base_model=model_name, rank=16).result()
    inputs: list[dict[str, Any]] = [{"target_tokens": t[1:], "weights": w} for t, w in examples]
    data = [types.Datum(model_input=types.ModelInput.from_ints(t[:-1]), loss_fn_inputs=i)
            for (t, _), i in zip(examples, inputs, strict=True)]  # fmt: skip
    adam = types.AdamParams(learning_rate=1e-3)

    def one() -> None:
        fb = training.forward_backward(data, "cross_entropy")
        opt = training.optim_step(adam)
        fb.result()
        opt.result()

    one()
    started = time.perf_counter()
    for _ in range(steps):
        one()
    return (time.perf_counter() - started) / steps


def two_clients(url: str, model_name: str, examples: list[tuple[list[int], list[float]]], steps: int) -> float:
    """Seconds per step of the two clients together: the wall time of both loops over both clients' steps."""
    results: list[float] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(sdk_loop(url, model_name, examples, steps))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    # each thread's loop ran `steps` steps in results[i] * steps seconds, side by side
    return max(results) * steps / (2 * steps)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    os.environ["TINKER_TELEMETRY"] = "0"
    with tempfile.TemporaryDirectory(prefix="bench-tinker-") as tmp_name:
        tmp = Path(tmp_name)
        model_dir = build_tiny_model(tmp)
        examples = _examples(model_dir, args.batch)
        # the thread budget the service's worker gets (worker.cpu_budget: a core left for the API on this host)
        threads = cpu_budget.plan_threads(api_on_host=True, workers_on_host=1).threads
        local = in_process(model_dir, examples, args.steps, threads)
        with one_command_service(Config("tinker", None), tmp) as (url, _proc, _log):
            one = sdk_loop(url, model_dir.name, examples, args.steps)
            two = two_clients(url, model_dir.name, examples, args.steps)
    figures: dict[str, Any] = {
        "steps": args.steps, "batch": args.batch, "torch_threads": threads,
        "in_process_s_per_step": round(local, 4), "one_client_s_per_step": round(one, 4),
        "two_clients_s_per_step": round(two, 4),
        "protocol_overhead": round(one / local, 3), "two_clients_throughput_vs_one": round(one / two, 3),
    }  # fmt: skip
    print(
        f"{args.steps} supervised steps of {args.batch} conversations on the tiny model (this CPU, "
        f"{threads} torch thread{'s' if threads != 1 else ''} in the trainer as in the service's worker):"
    )
    print(f"  in-process trainer   {local * 1000:8.1f} ms/step")
    print(f"  one SDK client       {one * 1000:8.1f} ms/step   ({one / local:.2f}x the in-process time)")
    print(f"  two SDK clients      {two * 1000:8.1f} ms/step   ({one / two:.2f}x one client's throughput)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
