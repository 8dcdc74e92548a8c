"""The GPU check without a GPU: its scripts parse, a dry run of the whole check passes on this CPU (every phase,
its result files published as each phase ends, the stack named), one phase reruns alone, and its report reads
what the phases leave, a check cut off midway included."""

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
PHASES = ("setup", "parity", "service", "tta", "bench-b4", "bench-b16")
FILES = {"setup": ["setup.txt"], "parity": ["parity.json"], "service": ["service.json", "service.log"],
         "tta": ["tta.json"], "bench-b4": ["bench_b4.json"], "bench-b16": ["bench_b16.json"]}  # fmt: skip
# A busy 2-core CPU: generous limits, small jobs (the GPU defaults are the seed's; here only the plumbing counts).
DRY_RUN_ENV = {
    "GPU_CHECK_DRY_RUN": "1", "GPU_CHECK_SHAPE": "tiny", "GPU_CHECK_RECORDS": "12", "GPU_CHECK_TTA_RECORDS": "8",
    "GPU_CHECK_MEAN_LEN": "48", "GPU_CHECK_PARITY_STEPS": "2", "GPU_CHECK_BUDGET_S": "1500",
    "GPU_CHECK_SETUP_S": "120", "GPU_CHECK_PARITY_S": "240", "GPU_CHECK_SERVICE_S": "300", "GPU_CHECK_TTA_S": "300",
    "GPU_CHECK_BENCH_B4_S": "240", "GPU_CHECK_BENCH_B16_S": "240", "GPU_CHECK_ROW_RESERVE_S": "60",
}  # fmt: skip


def check(tmp: Path, *args: str, timeout: float) -> tuple[subprocess.CompletedProcess[str], Path, Path]:
    work, out = tmp / "work", tmp / "out"
    work.mkdir(exist_ok=True)
    env = dict(os.environ, **DRY_RUN_ENV, PY=sys.executable, GPU_CHECK_WORK=str(work), OUT=str(out))
    result = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh"), *args], env=env, capture_output=True,
                            text=True, timeout=timeout)  # fmt: skip
    return result, work, out


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_wheels.sh"])
def test_scripts_parse(script: str) -> None:
    result = subprocess.run(["bash", "-n", str(SCRIPTS / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path, Path]:
    """The whole check, once, as `make gpu-check` runs it but dry (no wheels, no GPU, a tiny model)."""
    assert shutil.which("curl"), "the service phase sends the seed's curl request"
    return check(tmp_path_factory.mktemp("dry-run"), timeout=1300)


@pytest.mark.timeout(1400)
def test_dry_run_of_the_whole_check_passes_every_phase(
    dry_run: tuple[subprocess.CompletedProcess[str], Path, Path],
) -> None:
    result, _, out = dry_run
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    phases = [line.split("\t") for line in (out / "phases.tsv").read_text().splitlines()]
    final = {name: code for name, code, *_ in phases}  # a later line replaces an earlier one
    assert list(final) == list(PHASES) and set(final.values()) == {"0"}, phases
    assert [name for name, code, *_ in phases if code == "running"] == list(PHASES)  # each marked as it started
    for phase in PHASES:
        for name in FILES[phase]:
            assert (out / name).is_file(), f"{phase}: {name} not published"
    report = (out / "report.txt").read_text()
    assert report.endswith("ALL CHECKS PASS\n") and result.stdout.rstrip().endswith("ALL CHECKS PASS")
    # The stack, at the start (setup) and in the report: no GPU in a dry run, and the packages' versions.
    stack = (out / "setup.txt").read_text().strip()
    assert stack.startswith("no GPU; CUDA ") and f"torch {torch.__version__}" in stack
    for package in ("transformers", "peft", "trl"):
        assert f"{package} " in stack
    assert f"stack: {stack}" in result.stdout.split("=== parity")[0]
    assert report.startswith(f"stack: {stack}\n")
    assert (out / "gpu_check.log").read_text().count("=== GPU check summary") == 1


def test_dry_run_trains_the_seed_curl_job_and_times_the_adapter(
    dry_run: tuple[subprocess.CompletedProcess[str], Path, Path],
) -> None:
    result, _, out = dry_run
    assert "POST /train -> 202" in result.stdout
    status = json.loads((out / "service.json").read_text())["status"]
    assert status["status"] == "completed"
    assert status["current_step"] == status["total_steps"] == 9  # 12 records, batch 4, 3 epochs: the seed defaults
    assert status["tokens_per_second"] > 0 and status["loss"] > 0
    tta = json.loads((out / "tta.json").read_text())
    assert tta["plan"]["records"] == 8 and tta["plan"]["epochs"] == 1 and tta["plan"]["batch_size"] == 4
    assert [r["engine"] for r in tta["results"]] == ["fast", "trl"]
    for r in tta["results"]:
        assert [j["steps"] for j in r["jobs"]] == [2, 2]
        assert r["cold_s"] > r["startup_s"] > 0 and r["warm_s"] > 0
    assert "reduced from the seed's default job (200 chats x 3 epochs, batch 4)" in result.stdout
    b16 = json.loads((out / "bench_b16.json").read_text())
    assert [r["engine"] for r in b16["results"]] == ["fast", "trl"]  # TRL at batch 16 too


@pytest.mark.timeout(600)
def test_one_phase_reruns_alone(dry_run: tuple[subprocess.CompletedProcess[str], Path, Path], tmp_path: Path) -> None:
    _, work, _ = dry_run
    env = dict(os.environ, **DRY_RUN_ENV, PY=sys.executable, GPU_CHECK_WORK=str(work), OUT=str(tmp_path / "out"))
    (work / "parity.json").unlink()
    result = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh"), "--phase", "parity", "300"], env=env,
                            capture_output=True, text=True, timeout=500)  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert result.stdout.startswith("gpu check: ") and ", phase parity alone" in result.stdout.splitlines()[0]
    assert "stack: no GPU; CUDA " in result.stdout
    report = (tmp_path / "out" / "report.txt").read_text()
    assert {line.split()[0] for line in report.splitlines()[1:-2]} == {"phase", "parity"}  # that phase only
    assert report.endswith("ALL CHECKS PASS\n")
    assert (tmp_path / "out" / "parity.json").is_file() and (tmp_path / "out" / "stack.txt").is_file()
    assert (work / "phases.tsv").read_text().splitlines()[-1].startswith("parity\t0\t")
    unknown = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh"), "--phase", "bench"], env=env,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert unknown.returncode == 2 and "--phase: one of setup parity service tta bench-b4 bench-b16" in unknown.stderr


def test_parity_passes_on_a_bf16_base_at_the_seed_defaults(
    dry_run: tuple[subprocess.CompletedProcess[str], Path, Path],
) -> None:
    report = json.loads((dry_run[2] / "parity.json").read_text())
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


def _tta_result(engine: str, cold: float, warm: float) -> dict[str, object]:
    jobs = [{"steps": 150, "final_loss": 1.0, "started": 0.0, "saved": cold}] * 2
    return {"engine": engine, "device": "NVIDIA H200", "cold_s": cold, "startup_s": 5.0, "warm_s": warm, "jobs": jobs}


def test_report_reads_the_phases_and_fails_what_did_not_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checks = [{"name": "first-step loss", "ok": True, "detail": "rel 1e-4"}]
    (tmp_path / "parity.json").write_text(json.dumps({"checks": checks}))
    (tmp_path / "setup.txt").write_text("NVIDIA H200 (139 GiB, sm_90); CUDA 12.8; torch 2.13.0\n")
    # tta was still running when the check was stopped: its "running" line is the last word on it.
    (tmp_path / "phases.tsv").write_text(
        "setup\t0\t9\t25\nparity\trunning\t0\t45\nparity\t0\t30\t45\nservice\t124\t50\t50\ntta\trunning\t0\t70\n"
    )
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
    table = gpu_report.format_rows(rows, timing, gpu_report.stack_line(tmp_path))
    result = {(r.phase, r.check): r.result for r in rows}
    assert table.startswith("stack: NVIDIA H200 (139 GiB, sm_90); CUDA 12.8; torch 2.13.0\n")
    assert result[("setup", "wheels installed, imports, CUDA")] == "PASS"
    assert result[("parity", "first-step loss")] == "PASS"
    assert result[("service", "seed curl POST /train -> completed")] == "FAIL"
    assert "timed out after 50 s" in table
    assert result[("tta", "time to adapter")] == "FAIL"
    assert "cut off while running (limit 70 s)" in table
    assert "useful MFU 25.0%, warm-up 40 s" in table
    assert result[("bench b4", "fast")] == result[("bench b4", "trl")] == "PASS"
    assert result[("bench b16", "benchmark")] == "FAIL"
    assert result[("target", "b4 fast >= 10x TRL tokens/s")] == "MET"  # 12x
    assert result[("target", "b4 fast <= 0.5x TRL peak memory")] == "MET"  # 0.25x
    assert table.endswith("3 CHECK(S) FAILED")
    assert gpu_report.main([str(tmp_path)]) == 1

    # The time-to-adapter phase finished after all: its rows, and the targets against TRL's cold and warm jobs.
    tta = {"plan": {"records": 200, "epochs": 1, "batch_size": 4},
           "results": [_tta_result("fast", 40.0, 6.0), _tta_result("trl", 35.0, 20.0)]}  # fmt: skip
    (tmp_path / "tta.json").write_text(json.dumps(tta))
    with (tmp_path / "phases.tsv").open("a") as f:
        f.write("tta\t0\t66\t70\n")
    capsys.readouterr()
    assert gpu_report.main([str(tmp_path), "--phases", "tta"]) == 0
    table = capsys.readouterr().out
    result = {(r.phase, r.check): r.result for r in gpu_report.collect(tmp_path, ["tta"])[0]}
    assert result == {
        ("tta", "fast"): "PASS",
        ("tta", "trl"): "PASS",
        ("target", "time to adapter cold <= 1.0x TRL"): "MISSED",  # 1.14x
        ("target", "time to adapter warm <= 0.5x TRL"): "MET",  # 0.30x
    }
    assert "cold 40.0 s (start-up 5.0 s), warm 6.0 s; 200 chats x 1 ep, batch 4" in table
    assert "phases (used/limit): tta 66/70 s" in table and table.rstrip().endswith("ALL CHECKS PASS")
