"""`/status` carries the worker's GPU memory while a job runs, as the seed's status did."""

from __future__ import annotations

from pathlib import Path

from tests.service import Service, submit_long, wait_running


def test_status_reports_gpu_memory_while_a_job_runs(service: Service, tiny_model_dir: Path) -> None:
    job_id = submit_long(service, tiny_model_dir)
    wait_running(service, job_id)
    status = service.get("/status").json()
    assert status["job_id"] == job_id and status["job_status"] == "running"
    assert status["allocated_gpu_memory"] == 0.0 and status["reserved_gpu_memory"] == 0.0  # a CPU worker
    assert service.post(f"/jobs/{job_id}/cancel").status_code == 202
    service.wait_for(job_id, {"cancelled"})
    assert "allocated_gpu_memory" not in service.get("/status").json()  # only while it runs
