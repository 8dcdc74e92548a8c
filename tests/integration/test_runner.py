"""`lora-server --base_path DIR --port N`: one command starts everything; a signal stops everything."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from launcher.embedded_redis import free_port
from tests.data import easy_records, jsonl
from tests.integration.process_tree import alive
from tests.service import ROOT, wait_until, wait_until_up


def _descendants(pid: int) -> set[int]:
    found: set[int] = set()
    stack = [pid]
    while stack:
        p = stack.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            kids = (task / "children").read_text().split() if (task / "children").exists() else []
            for kid in map(int, kids):
                if kid not in found:
                    found.add(kid)
                    stack.append(kid)
    return found


def _alive(pids: set[int]) -> set[int]:
    return {p for p in pids if alive(p)}


# Ctrl+C (SIGINT) ends test_a_killed_worker_is_restarted_and_the_service_stays_up below.
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_one_command_runs_the_service_and_a_signal_leaves_nothing_behind(
    tmp_path: Path, tiny_model_dir: Path, sig: signal.Signals
) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "LORA_REDIS_URL"}
    env.update({"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "LORA_MIN_FREE_DISK_MB": "1"})
    cmd = [sys.executable, "-m", "cli", "--base_path", str(tmp_path / "models"), "--port", str(port)]
    with (tmp_path / "lora-server.log").open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until_up(url + "/readyz", proc, timeout=60), "service did not become ready"
        r = httpx.post(
            url + "/train",
            files={"config": (None, f'{{"epochs": 2, "model_name": "{tiny_model_dir}"}}'),
                   "file": ("training_data.json", jsonl(easy_records(4)), "application/json")},
            timeout=30,
        )  # fmt: skip
        assert r.status_code == 202, r.text
        status = wait_until(
            lambda: (body := httpx.get(url + "/status", timeout=5).json())["status"] != "training" and body,
            timeout=120,
            every=0.3,
            what="the job to end",
        )
        assert status["status"] == "completed", status
        assert Path(status["model_path"], "adapter_config.json").is_file()
        assert (tmp_path / "models" / ".redis" / "appendonlydir").is_dir()  # embedded Redis persists

        family = _descendants(proc.pid)
        assert len(family) >= 3  # Redis, worker (and its pool child), API
        proc.send_signal(sig)
        code = proc.wait(timeout=60)
        assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 0)
        # Even a runner killed outright takes its children with it.
        wait_until(lambda: not _alive(family), timeout=10, what=lambda: f"no process left: {_alive(family)}")
    finally:
        if proc.poll() is None:
            proc.kill()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_a_killed_worker_is_restarted_and_the_service_stays_up(tmp_path: Path, tiny_model_dir: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "LORA_REDIS_URL"}
    env.update({"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "LORA_MIN_FREE_DISK_MB": "1", "LORA_LEASE_TTL_S": "4",
                "LORA_MAX_ATTEMPTS": "1"})  # fmt: skip  # the killed job fails: the slot is free for the next
    cmd = [sys.executable, "-m", "cli", "--base_path", str(tmp_path / "models"), "--port", str(port)]
    log_path = tmp_path / "lora-server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def train(epochs: int) -> str:
        r = httpx.post(
            url + "/train",
            files={"config": (None, f'{{"epochs": {epochs}, "model_name": "{tiny_model_dir}"}}'),
                   "file": ("training_data.json", jsonl(easy_records(4)), "application/json")},
            timeout=30,
        )  # fmt: skip
        assert r.status_code == 202, r.text
        return str(r.json()["job_id"])

    def job(job_id: str) -> dict[str, object]:
        return dict(httpx.get(f"{url}/jobs/{job_id}", timeout=5).json())

    try:
        assert wait_until_up(url + "/readyz", proc, timeout=60), "service did not become ready"
        doomed = train(epochs=500)
        wait_until(lambda: job(doomed)["status"] == "running", timeout=60, what="the long job to start")
        workers = {p for p in _descendants(proc.pid) if "celery" in _cmdline(p) and "worker" in _cmdline(p)}
        assert workers
        for pid in workers:
            os.kill(pid, signal.SIGKILL)  # as the kernel's OOM killer would
        ended = wait_until(lambda: job(doomed)["status"] in ("failed", "succeeded") and job(doomed), timeout=60,
                           what="the lease to settle the killed worker's job")  # fmt: skip
        assert ended["status"] == "failed" and "worker lost" in str(ended["error"])
        assert proc.poll() is None and httpx.get(url + "/healthz", timeout=5).status_code == 200
        assert "restarting it in" in log_path.read_text()
        fresh = train(epochs=1)
        done = wait_until(lambda: job(fresh)["status"] in ("succeeded", "failed") and job(fresh), timeout=120,
                          what="a new job on the restarted worker")  # fmt: skip
        assert done["status"] == "succeeded", done
        family = _descendants(proc.pid)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        wait_until(lambda: not _alive(family), timeout=10, what=lambda: f"no process left: {_alive(family)}")
    finally:
        if proc.poll() is None:
            proc.kill()


def test_ctrl_c_mid_job_and_a_restart_continue_the_job_where_it_stopped(tmp_path: Path, tiny_model_dir: Path) -> None:
    """`make run`, a job, Ctrl+C: everything stops without a traceback, and the job, its state saved, goes
    back to the queue; the next `make run` on the same base path continues it from that step."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "LORA_REDIS_URL"}
    env.update({"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "LORA_MIN_FREE_DISK_MB": "1"})
    cmd = [sys.executable, "-m", "cli", "--base_path", str(tmp_path / "models"), "--port", str(port)]
    url = f"http://127.0.0.1:{port}"

    def start(log_name: str) -> subprocess.Popen[bytes]:
        with (tmp_path / log_name).open("wb") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        assert wait_until_up(url + "/readyz", proc, timeout=60), "service did not become ready"
        return proc

    def job(job_id: str) -> dict[str, Any]:
        return dict(httpx.get(f"{url}/jobs/{job_id}", timeout=5).json())

    proc = start("first.log")
    try:
        r = httpx.post(
            url + "/train",
            files={"config": (None, f'{{"epochs": 150, "batch_size": 2, "model_name": "{tiny_model_dir}"}}'),
                   "file": ("training_data.json", jsonl(easy_records(8)), "application/json")},
            timeout=30,
        )  # fmt: skip
        assert r.status_code == 202, r.text
        job_id = str(r.json()["job_id"])
        wait_until(lambda: job(job_id)["progress"]["current_step"] >= 10, timeout=120, what="the job to train")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=150) == 0
        log = (tmp_path / "first.log").read_text()
        assert "Traceback" not in log and "WorkerLostError" not in log, log[-4000:]

        proc = start("second.log")
        done = wait_until(lambda: job(job_id)["status"] in ("succeeded", "failed", "cancelled") and job(job_id),
                          timeout=240, what="the job to end after the restart")  # fmt: skip
        assert done["status"] == "succeeded", done
        events = httpx.get(f"{url}/jobs/{job_id}/events", params={"limit": 1000}, timeout=5).json()["data"]
        handed = [e["message"] for e in events if "is stopping: handed back at step" in e["message"]]
        resumed = [e["data"]["resumed_step"] for e in events if e["message"].startswith("resuming from step")]
        assert len(handed) == 1 and len(resumed) == 1, [e["message"] for e in events]
        assert handed[0].split("handed back at step ")[1].startswith(f"{resumed[0]}/")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
