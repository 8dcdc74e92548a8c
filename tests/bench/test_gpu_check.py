"""The GPU check's parts that run without a GPU: its scripts parse, its parity check runs (bf16 base, CPU),
its service phase trains a job through the seed's curl, and its report reads what the phases leave."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_parity, gpu_report

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_wheels.sh"])
def test_scripts_parse(script: str) -> None:
    result = subprocess.run(["bash", "-n", str(SCRIPTS / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def parity_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("parity") / "parity.json"
    assert gpu_parity.main(["--shape", "tiny", "--device", "cpu", "--loop-steps", "2", "--json", str(out)]) == 0
    return out


def test_parity_passes_on_a_bf16_base_at_the_seed_defaults(parity_report: Path) -> None:
    report = json.loads(parity_report.read_text())
    names = [c["name"] for c in report["checks"]]
    assert names == [
        "first-step loss", "LoRA gradients", "modules_to_save gradients", "all LoRA gradients",
        "default vs eager loop losses", "default vs eager loop updates",
    ]  # fmt: skip
    assert all(c["ok"] for c in report["checks"]), report["checks"]
    assert "chunked loss" in report["checks"][0]["detail"]
    assert len(report["loop"]["default"]) == len(report["loop"]["eager"]) == 2


def test_gradient_judge_fails_a_wrong_gradient() -> None:
    generator = torch.Generator().manual_seed(0)
    ref = {"a.lora_A": torch.randn(8, 4, generator=generator), "a.lora_B": torch.randn(4, 8, generator=generator)}
    same = {k: v * (1 + 1e-3) for k, v in ref.items()}
    wrong = {**same, "a.lora_B": -ref["a.lora_B"]}
    passing = gpu_parity.judge_grads(gpu_parity.compare_grads(ref, same), min_cos=0.99, max_rel=0.05, label="g")
    failing = gpu_parity.judge_grads(gpu_parity.compare_grads(ref, wrong), min_cos=0.99, max_rel=0.05, label="g")
    assert passing.ok and not failing.ok
    assert "a.lora_B cos=-1.0000" in failing.detail


def test_service_phase_trains_a_job_through_the_seed_curl(tmp_path: Path) -> None:
    assert shutil.which("curl"), "the phase sends the seed's curl request"
    env = dict(os.environ, GPU_CHECK_WORK=str(tmp_path), GPU_CHECK_SHAPE="tiny", GPU_CHECK_RECORDS="12",
               PY=sys.executable, GPU_CHECK_DRY_RUN="1")  # fmt: skip
    result = subprocess.run(
        ["bash", str(SCRIPTS / "gpu_check.sh"), "--phase", "service", "240"],  # generous: a shared, busy CPU
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "POST /train -> 202" in result.stdout
    status = json.loads((tmp_path / "service.json").read_text())["status"]
    assert status["status"] == "completed"
    assert status["current_step"] == status["total_steps"] == 9  # 12 records, batch 4, 3 epochs: the seed defaults
    assert status["tokens_per_second"] > 0 and status["loss"] > 0


def test_report_reads_the_phases_and_fails_what_did_not_run(tmp_path: Path, parity_report: Path) -> None:
    shutil.copy(parity_report, tmp_path / "parity.json")
    (tmp_path / "setup.txt").write_text("NVIDIA H200 (139 GiB); torch 2.11.0\n")
    (tmp_path / "phases.tsv").write_text("setup\t0\t9\t40\nparity\t0\t30\t100\nservice\t124\t140\t140\n")
    bench = {
        "results": [
            {"engine": "fast", "tokens_per_second": 60_000.0, "peak_memory_bytes": 4 * 2**30, "mfu": 0.3,
             "useful_mfu": 0.25, "warmup_s": 40.0, "events": []},
            {"engine": "trl", "tokens_per_second": 5_000.0, "peak_memory_bytes": 16 * 2**30, "mfu": 0.02,
             "useful_mfu": 0.01, "warmup_s": None, "events": []},
        ]
    }  # fmt: skip
    (tmp_path / "bench_b4.json").write_text(json.dumps(bench))
    rows, timing = gpu_report.collect(tmp_path)
    table = gpu_report.format_rows(rows, timing)
    result = {(r.phase, r.check): r.result for r in rows}
    assert result[("setup", "wheels installed, imports, CUDA")] == "PASS"
    assert result[("parity", "first-step loss")] == "PASS"
    assert result[("service", "seed curl POST /train -> completed")] == "FAIL"
    assert "timed out after 140 s" in table
    assert "useful MFU 25.0%, warm-up 40 s" in table
    assert result[("bench b4", "fast")] == result[("bench b4", "trl")] == "PASS"
    assert result[("bench b16", "benchmark")] == "FAIL"
    assert result[("target", "b4 fast >= 10x TRL tokens/s")] == "MET"  # 12x
    assert result[("target", "b4 fast <= 0.5x TRL peak memory")] == "MET"  # 0.25x
    assert table.endswith("2 CHECK(S) FAILED")
    assert gpu_report.main([str(tmp_path)]) == 1
