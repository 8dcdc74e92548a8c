"""`python -m bench.train` on the CPU at a tiny shape: the seed-default table, fast engine and TRL rows."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from bench import train
from bench.train import SHAPES, EngineSpec

SHAPE = SHAPES["tiny"]
ARGS = ["--shape", "tiny", "--batches", "2", "--warmup-epochs", "1", "--timed-epochs", "1", "--mean-len", "48"]
STEADY = [*ARGS, "--no-time-to-adapter"]


def run_bench(tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[str, dict[str, Any]]:
    out = tmp_path / "bench.json"
    code = train.main([*STEADY, "--engines", "fast,trl", "--json", str(out), *extra])
    table = capsys.readouterr().out
    assert code == 0, table
    return table, json.loads(out.read_text())


def _row(table: str, engine: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"{engine} "))
    return line.split()


@pytest.mark.parametrize("modules_to_save", [True, False], ids=["seed-defaults", "no-modules-to-save"])
def test_cpu_table_compares_the_fast_engine_with_trl_at_the_seed_defaults(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], modules_to_save: bool
) -> None:
    table, report = run_bench(tmp_path, capsys, *([] if modules_to_save else ["--no-modules-to-save"]))
    saved = "lm_head, embed_tokens" if modules_to_save else "none"
    assert f"LoRA r=8 alpha=32 dropout=0.05 all-linear, modules_to_save=[{saved}], lr=0.0003" in table
    assert "4*N_dec*P" in table and "useful (same for every engine)" in table  # the formulas are printed
    for engine in ("fast", "trl"):
        cells = _row(table, engine)
        assert float(cells[1].replace(",", "")) > 0, cells  # tokens/s
        assert re.fullmatch(r"\d+\.\d+", cells[2]) and cells[3] == "GiB", cells
    assert re.search(r"^fast vs trl: \d+\.\d+x tokens/s, \d+\.\d+x peak memory$", table, re.M)
    target = r"^CPU target: fast >= 3x TRL tokens/s at <= 0.5x memory: (MET|MISSED) \(\d+\.\d+x, \d+\.\d+x\)$"
    assert re.search(target, table, re.M)
    assert "time to adapter" not in table and report["time_to_adapter"] is None

    results = {r["engine"]: r for r in report["results"]}
    # Both train exactly what a job trains: LoRA on every decoder linear, plus the tied vocab matrix in full.
    expected = SHAPE.lora_params(8) + (SHAPE.vocab * SHAPE.hidden if modules_to_save else 0)
    assert results["fast"]["trainable_params"] == results["trl"]["trainable_params"] == expected
    assert results["fast"]["tokens"] == results["trl"]["tokens"] > 0
    # CPU: the fast engine is eager and computes the useful work exactly; TRL pads and runs the head everywhere.
    assert results["fast"]["static_shapes"] is False
    assert results["fast"]["engine_flops"] == results["fast"]["useful_flops"]
    assert results["trl"]["engine_flops"] > results["trl"]["useful_flops"] == results["fast"]["useful_flops"]
    assert results["fast"]["mfu"] is None  # no peak known for a CPU


def test_fast_variants_and_bad_engines(tmp_path: Path) -> None:
    assert EngineSpec.parse("fast:eager") == EngineSpec("fast:eager", "fast", compile=False, cuda_graphs=False)
    assert EngineSpec.parse("fast:no-graphs") == EngineSpec("fast:no-graphs", "fast", compile=None, cuda_graphs=False)
    assert EngineSpec.parse("fast", no_compile=True) == EngineSpec("fast", "fast", compile=False, cuda_graphs=None)
    assert EngineSpec.parse("trl").engine == "trl"
    with pytest.raises(ValueError, match="only fast takes options"):
        EngineSpec.parse("trl:eager")
    with pytest.raises(SystemExit, match="--engines: unknown engine 'flash'"):
        train.main([*ARGS, "--engines", "fast,flash"])


def test_a_spent_time_budget_reports_rows_not_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = train.main([*ARGS, "--engines", "fast,trl", "--time-budget", "0.01"])
    table = capsys.readouterr().out
    assert code == 1
    assert "fast                       ERROR not run: --time-budget spent" in table
    assert "trl                        ERROR not run: time budget spent" in table.split("time to adapter")[1]


def test_make_bench_prints_steady_state_then_time_to_adapter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    code = train.main([*ARGS, "--engines", "fast,trl", "--tta-records", "6", "--tta-epochs", "1", "--json", str(out)])
    table = capsys.readouterr().out
    assert code == 0, table
    steady, tta = table.split("time to adapter (job claimed -> adapter saved): ")
    assert re.search(r"^fast vs trl: \d+\.\d+x tokens/s", steady, re.M)
    assert tta.startswith("6 chats x 1 epochs, batch 4 (2 steps), reduced from the seed's default job")
    for engine in ("fast", "trl"):
        cells = _row(tta, engine)
        cold, startup, warm, steps = float(cells[1]), float(cells[2]), float(cells[3]), int(cells[4])
        assert cold > startup > 0 and warm > 0 and steps == 2, cells
    assert re.search(r"^fast vs trl cold: \d+\.\d+x \(GPU target, shown on a CPU <= 1.0x: (MET|MISSED)\)$", tta, re.M)
    assert re.search(r"^fast vs trl warm: \d+\.\d+x \(GPU target, shown on a CPU <= 0.5x: (MET|MISSED)\)$", tta, re.M)
    report = json.loads(out.read_text())["time_to_adapter"]
    assert report["plan"]["records"] == 6 and report["plan"]["shape"] == "tiny"
    for r in report["results"]:  # every job saved its adapter (the child checks) and trained every step
        assert [job["steps"] for job in r["jobs"]] == [2, 2] and r["jobs"][1]["started"] >= r["jobs"][0]["saved"]
