"""The GPU check's closing table: one row per check (PASS/FAIL) and per benchmark target (MET/MISSED).

    python -m bench.gpu_report WORK_DIR [--phases NAME,...]

Reads what `scripts/gpu_check.sh` left in WORK_DIR: ``phases.tsv`` (name, exit code or "running"/"skip",
seconds, limit per phase; a later line for a phase replaces an earlier one), ``setup.txt`` (the stack; else
``stack.txt``, which a phase run alone writes), ``parity.json`` (`bench.gpu_parity`), ``service.json`` (the
job's last ``/status``), ``tta.json`` (`bench.time_to_adapter`) and ``bench_b4.json`` / ``bench_b16.json``
(`bench.train`). It reads whatever is there, so it also reports a check cut off midway. `--phases` limits the
table to those phases (a phase run alone). Exit code 1 when a check failed or did not run; a missed benchmark
target is reported, not failed.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import targets
from bench.time_to_adapter import ratios

PHASES = ("setup", "parity", "service", "tta", "bench-b4", "bench-b16")


@dataclass(frozen=True)
class Row:
    phase: str
    check: str
    result: str  # PASS, FAIL, MET, MISSED
    detail: str


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def phase_rows(work: Path) -> dict[str, tuple[str, float, float]]:
    """name -> (exit code or "skip", seconds, limit)."""
    out: dict[str, tuple[str, float, float]] = {}
    path = work / "phases.tsv"
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        name, code, seconds, limit = line.split("\t")
        out[name] = (code, float(seconds), float(limit))
    return out


def _ended(phase: tuple[str, float, float] | None) -> str:
    if phase is None:
        return "did not run"
    code, seconds, limit = phase
    if code == "skip":
        return "skipped: the time budget was spent"
    if code == "running":
        return f"cut off while running (limit {limit:.0f} s): the check was stopped"
    if code in ("124", "137"):
        return f"timed out after {seconds:.0f} s (limit {limit:.0f} s)"
    return f"exit {code} after {seconds:.0f} s"


def parity_rows(report: Any, phase: tuple[str, float, float] | None) -> list[Row]:
    if not report or not report.get("checks"):
        return [Row("parity", "fast vs reference (bf16, modules_to_save)", "FAIL", _ended(phase))]
    return [Row("parity", c["name"], "PASS" if c["ok"] else "FAIL", c["detail"]) for c in report["checks"]]


def service_rows(report: Any, phase: tuple[str, float, float] | None) -> list[Row]:
    status = (report or {}).get("status") or {}
    name = "seed curl POST /train -> completed"
    if status.get("status") != "completed":
        reason = (report or {}).get("error") or status.get("error") or _ended(phase)
        return [Row("service", name, "FAIL", f"{reason}; last /status {json.dumps(status)[:300]}")]
    tokens = status.get("tokens_per_second") or 0.0
    loss = status.get("loss")
    detail = (
        f"{status.get('current_step')}/{status.get('total_steps')} steps, {tokens:,.0f} tokens/s, "
        f"loss {loss if loss is None else f'{loss:.4f}'}, {report.get('seconds', 0):.0f} s from submit"
    )
    return [Row("service", name, "PASS", detail)]


def _engine(results: Sequence[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((r for r in results if r.get("engine") == name and "error" not in r), None)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def bench_rows(label: str, report: Any, phase: tuple[str, float, float] | None) -> list[Row]:
    if not report or not report.get("results"):
        return [Row(label, "benchmark", "FAIL", _ended(phase))]
    results = report["results"]
    rows = []
    for r in results:
        if "error" in r:
            rows.append(Row(label, r["engine"], "FAIL", r["error"].splitlines()[0][:200]))
            continue
        warmup = "" if r.get("warmup_s") is None else f", warm-up {r['warmup_s']:.0f} s"
        warnings = f", {len(r['events'])} warning(s)" if r.get("events") else ""
        detail = (
            f"{r['tokens_per_second']:,.0f} tok/s, {r['peak_memory_bytes'] / 2**30:.1f} GiB, "
            f"MFU {_pct(r.get('mfu'))}, useful MFU {_pct(r.get('useful_mfu'))}{warmup}{warnings}"
        )
        rows.append(Row(label, r["engine"], "PASS", detail))
    return rows


def tta_rows(report: Any, phase: tuple[str, float, float] | None) -> list[Row]:
    if not report or not report.get("results"):
        return [Row("tta", "time to adapter", "FAIL", _ended(phase))]
    plan = report["plan"]
    size = f"{plan['records']} chats x {plan['epochs']} ep, batch {plan['batch_size']}"
    rows = []
    for r in report["results"]:
        if "error" in r:
            rows.append(Row("tta", r["engine"], "FAIL", r["error"].splitlines()[0][:200]))
            continue
        warm = "n/a" if r.get("warm_s") is None else f"{r['warm_s']:.1f} s"
        detail = f"cold {r['cold_s']:.1f} s (start-up {r['startup_s']:.1f} s), warm {warm}; {size}"
        rows.append(Row("tta", r["engine"], "PASS", detail))
    return rows


def tta_target_rows(report: Any) -> list[Row]:
    cold, warm = ratios((report or {}).get("results") or [])
    rows = []
    if cold is not None:
        rows.append(Row("target", f"time to adapter cold <= {targets.TTA_COLD}x TRL",
                        targets.verdict(cold <= targets.TTA_COLD), f"{cold:.2f}x"))  # fmt: skip
    if warm is not None:
        rows.append(Row("target", f"time to adapter warm <= {targets.TTA_WARM}x TRL",
                        targets.verdict(warm <= targets.TTA_WARM), f"{warm:.2f}x"))  # fmt: skip
    return rows


def target_rows(b4: Any, b16: Any) -> list[Row]:
    rows = []
    results4 = (b4 or {}).get("results") or []
    fast, trl = _engine(results4, "fast"), _engine(results4, "trl")
    if fast and trl:
        speedup = fast["tokens_per_second"] / trl["tokens_per_second"]
        memory = fast["peak_memory_bytes"] / trl["peak_memory_bytes"]
        rows.append(
            Row("target", f"b4 fast >= {targets.GPU_SPEEDUP_B4:.0f}x TRL tokens/s", targets.verdict(speedup >= targets.GPU_SPEEDUP_B4),
                f"{speedup:.2f}x ({fast['tokens_per_second']:,.0f} vs {trl['tokens_per_second']:,.0f})")
        )  # fmt: skip
        rows.append(
            Row("target", f"b4 fast <= {targets.GPU_MEMORY_B4}x TRL peak memory", targets.verdict(memory <= targets.GPU_MEMORY_B4),
                f"{memory:.2f}x ({fast['peak_memory_bytes'] / 2**30:.1f} vs {trl['peak_memory_bytes'] / 2**30:.1f} GiB)")
        )  # fmt: skip
    fast16 = _engine((b16 or {}).get("results") or [], "fast")
    if fast16:
        mfu = fast16.get("useful_mfu")
        rows.append(
            Row("target", f"b16 fast useful MFU >= {targets.GPU_MFU_B16:.0%}", targets.verdict(mfu is not None and mfu >= targets.GPU_MFU_B16),
                f"{_pct(mfu)} (engine's own FLOPs: {_pct(fast16.get('mfu'))})")
        )  # fmt: skip
        tokens = fast16["tokens_per_second"]
        rows.append(
            Row("target", f"b16 fast >= {targets.GPU_TOKENS_B16:,} tokens/s", targets.verdict(tokens >= targets.GPU_TOKENS_B16),
                f"{tokens:,.0f} tokens/s")
        )  # fmt: skip
    return rows


def collect(work: Path, phases: Sequence[str] = PHASES) -> tuple[list[Row], str]:
    """The table's rows for `phases` from what `work` holds, and the phases' time used per limit."""
    ran = phase_rows(work)
    b4, b16, tta = _load(work / "bench_b4.json"), _load(work / "bench_b16.json"), _load(work / "tta.json")
    rows = []
    if "setup" in phases:
        setup = ran.get("setup")
        rows.append(Row("setup", "wheels installed, imports, CUDA", "PASS" if setup and setup[0] == "0" else "FAIL",
                        _ended(setup) if setup and setup[0] != "0" else "the stack: first line"))  # fmt: skip
    if "parity" in phases:
        rows += parity_rows(_load(work / "parity.json"), ran.get("parity"))
    if "service" in phases:
        rows += service_rows(_load(work / "service.json"), ran.get("service"))
    if "tta" in phases:
        rows += tta_rows(tta, ran.get("tta"))
    if "bench-b4" in phases:
        rows += bench_rows("bench b4", b4, ran.get("bench-b4"))
    if "bench-b16" in phases:
        rows += bench_rows("bench b16", b16, ran.get("bench-b16"))
    rows += target_rows(b4 if "bench-b4" in phases else None, b16 if "bench-b16" in phases else None)
    rows += tta_target_rows(tta if "tta" in phases else None)
    timing = ", ".join(f"{name} {seconds:.0f}/{limit:.0f} s" for name, (_, seconds, limit) in ran.items()
                       if name in phases)  # fmt: skip
    return rows, timing


def stack_line(work: Path) -> str:
    """The stack the check ran on, as its setup (or a phase run alone) recorded it."""
    for name in ("setup.txt", "stack.txt"):
        if (work / name).exists():
            return (work / name).read_text().strip()
    return "not recorded (setup did not finish)"


def format_rows(rows: Sequence[Row], timing: str, stack: str | None = None) -> str:
    width = max(len(r.check) for r in rows)
    lines = [] if stack is None else [f"stack: {stack}"]
    lines.append(f"{'phase':<9}  {'check':<{width}}  {'result':<6}  detail")
    lines += [f"{r.phase:<9}  {r.check:<{width}}  {r.result:<6}  {r.detail}" for r in rows]
    failed = sum(r.result == "FAIL" for r in rows)
    lines.append(f"phases (used/limit): {timing}")
    lines.append("ALL CHECKS PASS" if not failed else f"{failed} CHECK(S) FAILED")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_report", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("work", type=Path, help="the check's work dir")
    parser.add_argument("--phases", default=",".join(PHASES), help="comma-separated phases to report")
    args = parser.parse_args(argv)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if unknown := [p for p in phases if p not in PHASES]:
        parser.error(f"--phases: unknown {', '.join(unknown)} (choose from {', '.join(PHASES)})")
    rows, timing = collect(args.work, phases)
    print(format_rows(rows, timing, stack_line(args.work)))
    return 1 if any(r.result == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
