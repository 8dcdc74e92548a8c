"""A real worker's pool child trains with the torch threads its CPU budget gives (worker.cpu_budget), says so
once in its log and in the job's events, and the generation worker takes the same budget."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from launcher.embedded_redis import free_port
from tests.service import ROOT, Service, flush, submit, wait_until, wait_until_up
from worker.cpu_budget import available_cores, reserved_cores


@pytest.fixture
def start_service(tmp_path: Path, redis_url: str) -> Iterator[Any]:
    """Start the service (worker, generation worker, API) with these variables; stopped at the end."""
    started: list[Service] = []

    def start(**env: str) -> Service:
        flush(redis_url)
        logs = tmp_path / f"logs{len(started)}"
        svc = Service(base_path=tmp_path / "base", redis_url=redis_url, log_dir=logs, env_extra=env)
        started.append(svc)
        svc.start()
        return svc

    yield start
    for svc in started:
        svc.stop()


def _trained_threads(service: Service, model_dir: Path) -> int:
    """Run a short job to its end; the torch thread count its run reported."""
    r = submit(service, model_dir, epochs=1)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    job = service.wait_for(job_id, {"succeeded", "failed", "cancelled"}, timeout=180)
    assert job["status"] == "succeeded", job
    events = service.get(f"/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    (setup,) = [e for e in events if "torch_threads" in e["data"]]
    threads = int(setup["data"]["torch_threads"])
    assert f"{threads} CPU thread" in setup["message"]
    return threads


def test_a_shared_host_leaves_the_api_a_core(start_service: Any, tiny_model_dir: Path) -> None:
    # As the launcher starts them, with no OMP_NUM_THREADS of the operator's (the test service sets one).
    svc = start_service(OMP_NUM_THREADS="", MKL_NUM_THREADS="", LORA_API_ON_HOST="true", LORA_WORKERS_ON_HOST="1")
    cores = available_cores()
    expected = max(1, cores - reserved_cores(cores, True))
    line = f"torch threads: {expected} (cores available {cores}, reserved {reserved_cores(cores, True)} for the API"
    assert _trained_threads(svc, tiny_model_dir) == expected
    assert svc.logs("worker").count(line) == 1  # logged once, by the pool child that ran the job
    svc.wait_for_log(line, which="generator")


def test_lora_torch_threads_is_what_torch_runs_with(start_service: Any, tiny_model_dir: Path) -> None:
    svc = start_service(LORA_TORCH_THREADS="3", LORA_API_ON_HOST="true")  # over the test service's OMP_NUM_THREADS=2
    assert _trained_threads(svc, tiny_model_dir) == 3
    assert "torch threads: 3 (set by LORA_TORCH_THREADS" in svc.logs("worker")


def test_the_one_command_mode_tells_its_workers_the_api_shares_the_host(tmp_path: Path) -> None:
    keep_out = ("LORA_REDIS_URL", "LORA_API_KEY", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "LORA_TORCH_THREADS")
    env = {k: v for k, v in os.environ.items() if k not in keep_out}
    env.update({"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "LORA_MIN_FREE_DISK_MB": "1"})
    port, log_path = free_port(), tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "cli", "serve", "--base_path", str(tmp_path / "models"), "--port", str(port)]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    cores = available_cores()
    line = f"torch threads: {max(1, cores - reserved_cores(cores, True))} (cores available {cores}, reserved "
    try:
        assert wait_until_up(f"http://127.0.0.1:{port}/readyz", proc, timeout=90), log_path.read_text()
        # The training worker's pool child and the generation worker, each once.
        wait_until(lambda: log_path.read_text().count(line) == 2, timeout=60, what=lambda: log_path.read_text())
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
