"""Time to adapter: what a user waits for, from a job claimed to its adapter saved, our job path against TRL.

    python -m bench.time_to_adapter --shape tiny|qwen2.5-0.5b [--records 200] [--epochs 3] [--batch-size 4] \\
        [--engines fast,trl] [--model DIR] [--time-budget S] [--json OUT]

The job is the seed's default one: `--records` generated chats (`tests.fixtures.chat_data`), a random-weight
chat model of the shape with its tokenizer on disk (`tests.fixtures.tiny_model`), and a default `TrainConfig`
(LoRA r=8 all-linear, lm_head + embed_tokens trained, 3 epochs at batch 4) but for the model's folder.

Each engine runs in a fresh process that does the job twice, one after the other:
  cold  from the process's spawn (a worker's fresh child: interpreter, imports) to the first adapter on disk:
        model load, tokenize, compile, train, save
  warm  the second job of the same model in the same process, start to adapter saved: whatever the engine
        keeps between jobs (a resident base model, compiled code) is reused
`fast` is the job path itself: `worker.training.train_model` with a job's paths (checkpoints, step log,
training state), as the worker's runner calls it, so what the worker learns to reuse shows up here. `trl` is
the seed's approach for the same job: load the model, the same LoRA, the same tokenization (ours: TRL gets
pre-tokenized examples, see `bench.trl_baseline`), `SFTTrainer`, `save_pretrained`; it reuses nothing.
On-disk compile caches (torch's, wherever they are kept) persist across processes: on a machine that ran the
check before, a cold job may find them filled, as a worker host would.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import targets
from bench.child import run_child, terminated

ENGINES = ("fast", "trl")
CHILD_RESERVE_S = 25.0  # with a time budget: kept back for each engine still to run
MODEL_SHAPES = ("tiny", "qwen2.5-0.5b")  # tests.fixtures.tiny_model's


@dataclass(frozen=True)
class TtaPlan:
    """The job each engine does twice, and which engines."""

    shape: str  # the model's shape (tests.fixtures.tiny_model.SHAPES)
    records: int = 200  # chats in the dataset
    epochs: int = 3
    batch_size: int = 4
    jobs: int = 2  # one cold, then warm ones
    seed: int = 0  # the dataset's
    engines: tuple[str, ...] = ENGINES

    @property
    def steps(self) -> int:
        return self.epochs * -(-self.records // self.batch_size)

    def describe(self) -> str:
        size = f"{self.records} chats x {self.epochs} epochs, batch {self.batch_size} ({self.steps} steps)"
        if (self.records, self.epochs, self.batch_size) == (200, 3, 4):
            return f"{size}, the seed's default job"
        return f"{size}, reduced from the seed's default job (200 chats x 3 epochs, batch 4)"


# --------------------------------------------------------------------------- one engine (child)


def _fast_job(model: Path, data: Path, work: Path, plan: TtaPlan, events: list[str]) -> dict[str, Any]:
    from shared.config import TrainConfig
    from shared.events import EventPayload, event_type
    from worker.training import LocalControl, RunPaths, train_model

    def on_event(event: EventPayload, message: str) -> None:
        if event_type(event) == "warning":
            events.append(f"warning: {message}")

    config = TrainConfig(model_name=str(model), epochs=plan.epochs, batch_size=plan.batch_size)
    # A job's paths, as `RunPaths.of_job` gives them; state saves only at epoch ends (a short job never
    # reaches a periodic save).
    paths = RunPaths(work / "adapter", checkpoints=work / "checkpoints", results=work / "steps.csv",
                     state=work / "state", job_id=work.name)  # fmt: skip
    result = train_model(config, data, paths=paths, control=LocalControl(on_event=on_event))
    assert result.output_dir is not None and not result.stopped
    return {"steps": result.steps, "final_loss": result.final_loss, "adapter": str(result.output_dir)}


def _trl_job(model: Path, data: Path, work: Path, plan: TtaPlan, events: list[str]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.trl_baseline import run_trl_baseline
    from shared.config import TrainConfig
    from shared.stored_dataset import read_records
    from worker.training.data import tokenize_dataset
    from worker.training.model_loading import apply_lora, pick_device, resolve_dtype

    cfg = TrainConfig(model_name=str(model), epochs=plan.epochs, batch_size=plan.batch_size)
    device = pick_device()
    tokenizer = AutoTokenizer.from_pretrained(model)
    base = AutoModelForCausalLM.from_pretrained(
        model, dtype=resolve_dtype(cfg, device), attn_implementation="sdpa", device_map=device.type
    )
    peft_model = apply_lora(base, cfg, None)
    examples, _ = tokenize_dataset(tokenizer, read_records(data), max_length=cfg.max_length,
                                   response_template=cfg.response_template)  # fmt: skip
    result = run_trl_baseline(peft_model, tokenizer, examples, epochs=cfg.epochs, batch_size=cfg.batch_size,
                              learning_rate=cfg.learning_rate, seed=cfg.seed)  # fmt: skip
    peft_model.save_pretrained(str(work / "adapter"))
    return {"steps": result["steps"], "final_loss": result["final_loss"], "adapter": str(work / "adapter")}


def run_engine(engine: str, model: Path, data: Path, work: Path, plan: TtaPlan) -> dict[str, Any]:
    """The engine's jobs in this process, each with wall-clock marks (`time.time`, comparable with the parent's)."""
    job = _fast_job if engine == "fast" else _trl_job
    import torch  # the imports a job's child pays before its first job

    import worker.training.run  # noqa: F401

    imported = time.time()
    events: list[str] = []
    jobs = []
    for i in range(plan.jobs):
        started = time.time()
        outcome = job(model, data, work / f"job-{i + 1}", plan, events)
        saved = time.time()
        if not (Path(outcome["adapter"]) / "adapter_model.safetensors").exists():
            raise RuntimeError(f"job {i + 1}: no adapter_model.safetensors in {outcome['adapter']}")
        jobs.append({**outcome, "started": started, "saved": saved})
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"engine": engine, "device": device, "imported": imported, "jobs": jobs, "events": events}


# --------------------------------------------------------------------------- driver (parent)


def measure(
    plan: TtaPlan, *, model: Path | None = None, time_budget: float | None = None, row_reserve: float = CHILD_RESERVE_S
) -> dict[str, Any]:
    """Each engine's cold and warm time to adapter (a fresh process each); `model`: a model folder to use
    (else one of `plan.shape` is built here, untimed)."""
    started = time.monotonic()
    results: list[dict[str, Any]] = []
    if time_budget is not None and time_budget <= 0:  # not even the model is built
        results = [{"engine": engine, "error": "not run: time budget spent"} for engine in plan.engines]
        return {"plan": asdict(plan), "results": results}
    with tempfile.TemporaryDirectory(prefix="tta-") as tmp:
        root = Path(tmp)
        if model is None:
            from tests.fixtures.tiny_model import build_tiny_model

            model = build_tiny_model(root / "model", shape=plan.shape)  # type: ignore[arg-type]
        data = root / "train.jsonl"
        from tests.fixtures.chat_data import chat_records

        data.write_text("".join(json.dumps(r) + "\n" for r in chat_records(plan.records, seed=plan.seed)))
        for i, engine in enumerate(plan.engines):
            timeout = None
            if time_budget is not None:  # what is left, less a minimum kept for each engine still to run
                timeout = time_budget - (time.monotonic() - started) - row_reserve * (len(plan.engines) - i - 1)
                if timeout <= 0:
                    results.append({"engine": engine, "error": "not run: time budget spent"})
                    continue
            results.append(_run_engine_child(engine, model, data, root / engine, plan, timeout))
    return {"plan": asdict(plan), "results": results}


def _run_engine_child(
    engine: str, model: Path, data: Path, work: Path, plan: TtaPlan, timeout: float | None
) -> dict[str, Any]:
    spawned: list[float] = []

    def command(out: Path) -> list[str]:
        spawned.append(time.time())
        return [sys.executable, "-m", "bench.time_to_adapter", "--child", engine, "--child-out", str(out),
                "--model", str(model), "--data", str(data), "--work", str(work), "--records", str(plan.records),
                "--epochs", str(plan.epochs), "--batch-size", str(plan.batch_size), "--jobs", str(plan.jobs)]  # fmt: skip

    result = run_child(command, engine, timeout)
    if "error" not in result:
        jobs = result["jobs"]
        result["startup_s"] = result["imported"] - spawned[0]
        result["cold_s"] = jobs[0]["saved"] - spawned[0]
        result["warm_s"] = min((j["saved"] - j["started"] for j in jobs[1:]), default=None)
    return result


def format_rows(report: dict[str, Any]) -> str:
    plan = TtaPlan(**{**report["plan"], "engines": tuple(report["plan"]["engines"])})
    results = report["results"]
    device = next((r["device"] for r in results if "device" in r), "?")
    lines = [
        f"time to adapter (job claimed -> adapter saved): {plan.describe()}, model shape {plan.shape}, device {device}",
        "  cold: a fresh process's first job (start-up, load, tokenize, compile, train, save); "
        "warm: a second job of the same model in that process",
        f"{'engine':<26} {'cold s':>8} {'start-up s':>10} {'warm s':>8} {'steps':>6} {'final loss':>10}",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"{r['engine']:<26} ERROR {r['error'].splitlines()[0]}")
            continue
        warm = "n/a" if r["warm_s"] is None else f"{r['warm_s']:.1f}"
        loss = r["jobs"][-1]["final_loss"]
        lines.append(
            f"{r['engine']:<26} {r['cold_s']:>8.1f} {r['startup_s']:>10.1f} {warm:>8} {r['jobs'][-1]['steps']:>6}"
            f" {'n/a' if loss is None else f'{loss:.4f}':>10}"
        )
    lines += ratio_lines(results, on_gpu=device not in ("cpu", "?"))
    lines += [f"{r['engine']}: {event}" for r in results for event in r.get("events", [])]
    return "\n".join(lines)


def ratios(results: Sequence[dict[str, Any]]) -> tuple[float | None, float | None]:
    """fast vs TRL, (cold, warm); None where either side has no figure."""
    by_engine = {r["engine"]: r for r in results if "error" not in r}
    fast, trl = by_engine.get("fast"), by_engine.get("trl")
    if fast is None or trl is None:
        return None, None
    cold = fast["cold_s"] / trl["cold_s"]
    warm = None if fast["warm_s"] is None or trl["warm_s"] is None else fast["warm_s"] / trl["warm_s"]
    return cold, warm


def ratio_lines(results: Sequence[dict[str, Any]], *, on_gpu: bool) -> list[str]:
    cold, warm = ratios(results)
    if cold is None:
        return ["fast vs trl: no ratio (an engine has no figure)"]
    where = "GPU target" if on_gpu else "GPU target, shown on a CPU"
    lines = [
        f"fast vs trl cold: {cold:.2f}x ({where} <= {targets.TTA_COLD}x: {targets.verdict(cold <= targets.TTA_COLD)})"
    ]
    if warm is not None:
        lines.append(
            f"fast vs trl warm: {warm:.2f}x ({where} <= {targets.TTA_WARM}x: {targets.verdict(warm <= targets.TTA_WARM)})"
        )
    return lines


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.time_to_adapter", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--shape", choices=MODEL_SHAPES, default="tiny")
    parser.add_argument("--records", type=int, default=200, help="chats in the job's dataset (seed: 200)")
    parser.add_argument("--epochs", type=int, default=3, help="the job's epochs (seed: 3)")
    parser.add_argument("--batch-size", type=int, default=4, help="the job's batch size (seed: 4)")
    parser.add_argument("--jobs", type=int, default=2, help="jobs per process: one cold, the rest warm")
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated: fast, trl")
    parser.add_argument("--model", type=Path, default=None, help="a model folder to use (default: built here)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds for all engines, --row-reserve kept back for each one after")  # fmt: skip
    parser.add_argument("--row-reserve", type=float, default=CHILD_RESERVE_S, help="default %(default)s s")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.records, args.epochs, args.batch_size, args.jobs) < 1:
        parser.error("--records, --epochs, --batch-size and --jobs must be >= 1")
    engines = tuple(e.strip() for e in args.engines.split(",") if e.strip())
    if unknown := [e for e in engines if e not in ENGINES]:
        parser.error(f"--engines: unknown {', '.join(unknown)} (choose from {', '.join(ENGINES)})")
    args.plan = TtaPlan(args.shape, args.records, args.epochs, args.batch_size, args.jobs, engines=engines)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(list(sys.argv[1:] if argv is None else argv))
    if args.child:
        args.child_out.write_text(json.dumps(run_engine(args.child, args.model, args.data, args.work, args.plan)))
        return 0
    signal.signal(signal.SIGTERM, terminated)
    report = measure(args.plan, model=args.model, time_budget=args.time_budget, row_reserve=args.row_reserve)
    print(format_rows(report), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if all("error" not in r for r in report["results"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
