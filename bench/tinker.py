"""The Tinker-compatible API's overhead and its scaling to two training clients, on this machine.

    python -m bench.tinker [--steps 50] [--batch 8] [--rounds 5] [--json OUT]

It builds the tiny random model locally (nothing is downloaded) and times the same supervised loop
(forward_backward + optim_step on `--batch` short conversations) three ways:
  in-process   the engine's trainer (worker.tinker.trainer) called directly, with the torch threads the
               service's worker gets
  one client   the `tinker` SDK against the whole service as `make run` starts it (`python -m cli serve`: one
               worker, embedded Redis, 127.0.0.1 only): the same steps through the protocol, futures and the
               hosting worker
  two clients  two SDK training clients on the same base (one hosting job: the base shared, their calls run
               together where both are ready), each running the loop in its own thread at once
The three take turns, `--rounds` times, `--steps / --rounds` steps each turn, so a machine whose speed drifts
(a shared VM's does, by tens of percent within a minute) slows all three alike. It prints seconds per step
over all rounds, the protocol's overhead (one client / in-process) and the two clients' throughput relative to
one, with the spread of the per-round ratios. It asserts nothing. Every process it started and every temp file
is removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
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


class InProcess:
    """The trainer called directly, with `threads` torch threads (as the service's worker has)."""

    def __init__(self, model_dir: Path, examples: list[tuple[list[int], list[float]]], threads: int) -> None:
        import torch

        from shared.config import TrainConfig
        from shared.tinker_ops import ForwardOp, OptimStepOp, TinkerDatum
        from worker.tinker.lora import apply_lora
        from worker.tinker.trainer import TinkerTrainer
        from worker.training.model_loading import load_base_model

        torch.set_num_threads(threads)
        base, _tok, engine = load_base_model(TrainConfig(model_name=str(model_dir), engine="fast"), torch.device("cpu"))
        self.trainer = TinkerTrainer(apply_lora(base, rank=16, seed=0), engine=engine, base=str(model_dir), rank=16)
        data = [TinkerDatum(tokens=t[:-1], target_tokens=t[1:], weights=w) for t, w in examples]
        self.op = ForwardOp(op="forward_backward", loss_fn="cross_entropy", data=data)
        self.step = OptimStepOp(learning_rate=1e-3)
        self.steps(1)  # warm-up

    def steps(self, n: int) -> float:
        """Seconds `n` steps take."""
        started = time.perf_counter()
        for _ in range(n):
            self.trainer.forward(self.op)
            self.trainer.optim_step(self.step)
        return time.perf_counter() - started


class SdkLoop:
    """One SDK training client running the loop against the service."""

    def __init__(self, url: str, model_name: str, examples: list[tuple[list[int], list[float]]]) -> None:
        import tinker
        from tinker import types

        self.service = tinker.ServiceClient(base_url=url, api_key="tml-bench")
        self.training = self.service.create_lora_training_client(base_model=model_name, rank=16).result()
        inputs: list[dict[str, Any]] = [{"target_tokens": t[1:], "weights": w} for t, w in examples]
        self.data = [types.Datum(model_input=types.ModelInput.from_ints(t[:-1]), loss_fn_inputs=i)
                     for (t, _), i in zip(examples, inputs, strict=True)]  # fmt: skip
        self.adam = types.AdamParams(learning_rate=1e-3)
        self.steps(1)  # warm-up (the model's loading is not counted)

    def steps(self, n: int) -> float:
        """Seconds `n` steps take: forward_backward and optim_step sent together, both awaited, as the
        cookbook's loops do."""
        started = time.perf_counter()
        for _ in range(n):
            fb = self.training.forward_backward(self.data, "cross_entropy")
            opt = self.training.optim_step(self.adam)
            fb.result()
            opt.result()
        return time.perf_counter() - started

    def close(self) -> None:
        """End the SDK session (its heartbeats stop) while the service still answers."""
        with contextlib.suppress(Exception):
            self.service.close("success").result(timeout=10)


def side_by_side(loops: Sequence[SdkLoop], n: int) -> float:
    """Seconds until every loop has run `n` steps, all started at once (each in its own thread)."""
    errors: list[BaseException] = []

    def run(loop: SdkLoop) -> None:
        try:
            loop.steps(n)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(loop,)) for loop in loops]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - started


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    os.environ["TINKER_TELEMETRY"] = "0"
    per_round = max(1, args.steps // args.rounds)
    steps = per_round * args.rounds
    local = one = two = 0.0
    overheads, speedups = [], []
    with tempfile.TemporaryDirectory(prefix="bench-tinker-") as tmp_name:
        tmp = Path(tmp_name)
        model_dir = build_tiny_model(tmp)
        examples = _examples(model_dir, args.batch)
        # the thread budget the service's worker gets (worker.cpu_budget: a core left for the API on this host)
        threads = cpu_budget.plan_threads(api_on_host=True, workers_on_host=1).threads
        trainer = InProcess(model_dir, examples, threads)
        with one_command_service(Config("tinker", None), tmp) as (url, _proc, _log):
            first, second = SdkLoop(url, model_dir.name, examples), SdkLoop(url, model_dir.name, examples)
            try:
                for _ in range(args.rounds):
                    round_local = trainer.steps(per_round)
                    round_one = first.steps(per_round)
                    round_two = side_by_side([first, second], per_round) / 2  # per step of either client
                    local, one, two = local + round_local, one + round_one, two + round_two
                    overheads.append(round_one / round_local)
                    speedups.append(round_one / round_two)
            finally:
                first.close()
                second.close()
    local, one, two = local / steps, one / steps, two / steps
    figures: dict[str, Any] = {
        "steps": steps, "rounds": args.rounds, "batch": args.batch, "torch_threads": threads,
        "in_process_s_per_step": round(local, 4), "one_client_s_per_step": round(one, 4),
        "two_clients_s_per_step": round(two, 4),
        "protocol_overhead": round(one / local, 3), "two_clients_throughput_vs_one": round(one / two, 3),
        "protocol_overhead_per_round": [round(x, 3) for x in overheads],
        "two_clients_throughput_per_round": [round(x, 3) for x in speedups],
    }  # fmt: skip
    print(
        f"{steps} supervised steps of {args.batch} conversations on the tiny model, in {args.rounds} rounds "
        f"(this CPU, {threads} torch thread{'s' if threads != 1 else ''} in the trainer as in the service's worker):"
    )
    print(f"  in-process trainer   {local * 1000:8.1f} ms/step")
    print(f"  one SDK client       {one * 1000:8.1f} ms/step   ({one / local:.2f}x the in-process time; "
          f"rounds {min(overheads):.2f}-{max(overheads):.2f}x)")  # fmt: skip
    print(f"  two SDK clients      {two * 1000:8.1f} ms/step   ({one / two:.2f}x one client's throughput; "
          f"rounds {min(speedups):.2f}-{max(speedups):.2f}x)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
