"""The GPU check's closing table: one row per check (PASS/FAIL) and per benchmark target (MET/MISSED).

    python -m bench.gpu_report WORK_DIR

Reads what `scripts/gpu_check.sh` left in WORK_DIR: ``phases.tsv`` (name, exit code, seconds, limit
per phase), ``setup.txt``, ``parity.json`` (`bench.gpu_parity`), ``service.json`` (the job's last
``/status``) and ``bench_b4.json`` / ``bench_b16.json`` (`bench.train`). Exit code 1 when a check
failed or did not run; a missed benchmark target is reported, not failed.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The targets on one H200 at Qwen2.5-0.5B's shape and the seed's defaults.
TARGET_SPEEDUP_B4 = 10.0  # fast vs TRL tokens/s at batch 4
TARGET_MEMORY_B4 = 0.5  # fast vs TRL peak memory at batch 4
TARGET_MFU_B16 = 0.35  # fast at batch 16 (useful FLOPs)
TARGET_TOKENS_B16 = 54_000  # the published best for a ~0.6B LoRA on an H100, tokens/s


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


def target_rows(b4: Any, b16: Any) -> list[Row]:
    rows = []
    results4 = (b4 or {}).get("results") or []
    fast, trl = _engine(results4, "fast"), _engine(results4, "trl")
    if fast and trl:
        speedup = fast["tokens_per_second"] / trl["tokens_per_second"]
        memory = fast["peak_memory_bytes"] / trl["peak_memory_bytes"]
        rows.append(
            Row("target", f"b4 fast >= {TARGET_SPEEDUP_B4:.0f}x TRL tokens/s", _met(speedup >= TARGET_SPEEDUP_B4),
                f"{speedup:.2f}x ({fast['tokens_per_second']:,.0f} vs {trl['tokens_per_second']:,.0f})")
        )  # fmt: skip
        rows.append(
            Row("target", f"b4 fast <= {TARGET_MEMORY_B4}x TRL peak memory", _met(memory <= TARGET_MEMORY_B4),
                f"{memory:.2f}x ({fast['peak_memory_bytes'] / 2**30:.1f} vs {trl['peak_memory_bytes'] / 2**30:.1f} GiB)")
        )  # fmt: skip
    fast16 = _engine((b16 or {}).get("results") or [], "fast")
    if fast16:
        mfu = fast16.get("useful_mfu")
        rows.append(
            Row("target", f"b16 fast useful MFU >= {TARGET_MFU_B16:.0%}", _met(mfu is not None and mfu >= TARGET_MFU_B16),
                f"{_pct(mfu)} (engine's own FLOPs: {_pct(fast16.get('mfu'))})")
        )  # fmt: skip
        tokens = fast16["tokens_per_second"]
        rows.append(
            Row("target", f"b16 fast >= {TARGET_TOKENS_B16:,} tokens/s", _met(tokens >= TARGET_TOKENS_B16),
                f"{tokens:,.0f} tokens/s")
        )  # fmt: skip
    return rows


def _met(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def collect(work: Path) -> tuple[list[Row], str]:
    phases = phase_rows(work)
    setup = phases.get("setup")
    header = (work / "setup.txt").read_text().strip() if (work / "setup.txt").exists() else "setup did not report"
    rows = [Row("setup", "wheels installed, imports, CUDA", "PASS" if setup and setup[0] == "0" else "FAIL", header)]
    rows += parity_rows(_load(work / "parity.json"), phases.get("parity"))
    rows += service_rows(_load(work / "service.json"), phases.get("service"))
    b4, b16 = _load(work / "bench_b4.json"), _load(work / "bench_b16.json")
    rows += bench_rows("bench b4", b4, phases.get("bench-b4"))
    rows += bench_rows("bench b16", b16, phases.get("bench-b16"))
    rows += target_rows(b4, b16)
    timing = ", ".join(f"{name} {seconds:.0f}/{limit:.0f} s" for name, (_, seconds, limit) in phases.items())
    return rows, timing


def format_rows(rows: Sequence[Row], timing: str) -> str:
    width = max(len(r.check) for r in rows)
    lines = [f"{'phase':<9}  {'check':<{width}}  {'result':<6}  detail"]
    lines += [f"{r.phase:<9}  {r.check:<{width}}  {r.result:<6}  {r.detail}" for r in rows]
    failed = sum(r.result == "FAIL" for r in rows)
    lines.append(f"phases (used/limit): {timing}")
    lines.append("ALL CHECKS PASS" if not failed else f"{failed} CHECK(S) FAILED")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        raise SystemExit("usage: python -m bench.gpu_report WORK_DIR")
    rows, timing = collect(Path(args[0]))
    print(format_rows(rows, timing))
    return 1 if any(r.result == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
