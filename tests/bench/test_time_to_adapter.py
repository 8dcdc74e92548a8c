"""`bench.time_to_adapter`'s plan and verdicts (the timed runs themselves: tests/bench/test_train.py and the GPU
check's dry run)."""

from __future__ import annotations

import pytest

from bench import time_to_adapter
from bench.time_to_adapter import TtaPlan


def _result(engine: str, cold: float, warm: float | None) -> dict[str, object]:
    return {"engine": engine, "cold_s": cold, "warm_s": warm}


def test_the_default_plan_is_the_seed_default_job() -> None:
    plan = TtaPlan("qwen2.5-0.5b")
    assert (plan.records, plan.epochs, plan.batch_size, plan.jobs, plan.steps) == (200, 3, 4, 2, 150)
    assert plan.describe() == "200 chats x 3 epochs, batch 4 (150 steps), the seed's default job"
    reduced = TtaPlan("tiny", records=201, epochs=1).describe()
    assert (
        reduced
        == "201 chats x 1 epochs, batch 4 (51 steps), reduced from the seed's default job (200 chats x 3 epochs, batch 4)"
    )


def test_ratios_and_targets_against_trl() -> None:
    results = [_result("fast", 30.0, 4.0), _result("trl", 40.0, 10.0)]
    assert time_to_adapter.ratios(results) == (0.75, 0.4)
    assert time_to_adapter.ratio_lines(results, on_gpu=True) == [
        "fast vs trl cold: 0.75x (GPU target <= 1.0x: MET)",
        "fast vs trl warm: 0.40x (GPU target <= 0.5x: MET)",
    ]
    slow = [_result("fast", 50.0, 6.0), _result("trl", 40.0, 10.0)]
    assert [line.rsplit(": ", 1)[1] for line in time_to_adapter.ratio_lines(slow, on_gpu=True)] == ["MISSED)"] * 2
    failed = [_result("fast", 30.0, 4.0), {"engine": "trl", "error": "exit 1: boom"}]
    assert time_to_adapter.ratios(failed) == (None, None)
    assert time_to_adapter.ratio_lines(failed, on_gpu=False) == ["fast vs trl: no ratio (an engine has no figure)"]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(SystemExit):
        time_to_adapter.main(["--engines", "fast,reference"])
    with pytest.raises(SystemExit):
        time_to_adapter.main(["--records", "0"])
