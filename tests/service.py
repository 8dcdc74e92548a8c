"""Running the real service for integration tests: uvicorn and a Celery worker as child processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from shared.embedded_redis import free_port
from shared.process import own_group_dies_with_parent
from shared.tasks import QUEUE

ROOT = Path(__file__).resolve().parent.parent


def _stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
    with contextlib.suppress(ProcessLookupError):  # stray prefork children
        os.killpg(proc.pid, signal.SIGKILL)


def wait_until_up(url: str, proc: subprocess.Popen[Any], *, timeout: float = 60) -> bool:
    """Poll `url` until it answers 200; False if `proc` exits or time runs out first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


@dataclass
class Service:
    base_path: Path
    redis_url: str
    log_dir: Path
    env_extra: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    api: subprocess.Popen[bytes] | None = None
    worker: subprocess.Popen[bytes] | None = None  # the newest worker
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "LORA_BASE_PATH": str(self.base_path),
                "LORA_REDIS_URL": self.redis_url,
                "LORA_LEASE_TTL_S": "4",
                "LORA_REAP_INTERVAL_S": "0.5",
                "LORA_MIN_FREE_DISK_MB": "1",
                "PYTHONPATH": str(ROOT),
                "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
                "OMP_NUM_THREADS": "2",
            }
        )
        env.update(self.env_extra)
        return env

    def start(self) -> None:
        self.base_path.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.start_worker()
        self.start_api()

    def start_api(self) -> None:
        log = (self.log_dir / "api.log").open("ab")
        cmd = [sys.executable, "-m", "uvicorn", "api.main:create_app", "--factory", "--host", "127.0.0.1",
               "--port", str(self.port), "--log-level", "warning"]  # fmt: skip
        self.api = subprocess.Popen(
            cmd, cwd=ROOT, env=self.env(), stdout=log, stderr=log, preexec_fn=own_group_dies_with_parent
        )
        if wait_until_up(self.url + "/healthz", self.api, timeout=30):
            return
        raise RuntimeError("API did not start:\n" + self.logs("api"))

    def start_worker(self, **env: str) -> None:
        log = (self.log_dir / "worker.log").open("ab")
        cmd = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--loglevel", "INFO",
               "--concurrency", "1", "-Q", QUEUE, "-n", f"test{len(self.workers) + 1}@%h"]  # fmt: skip
        self.worker = subprocess.Popen(
            cmd, cwd=ROOT, env={**self.env(), **env}, stdout=log, stderr=log, preexec_fn=own_group_dies_with_parent
        )
        self.workers.append(self.worker)

    def stop_api(self) -> None:
        _stop(self.api)

    def stop_worker(self, sig: int = signal.SIGTERM) -> None:
        _stop(self.worker, sig)

    def kill_worker_tree(self) -> None:
        """SIGKILL the worker and its prefork children at once, like a host losing power."""
        _stop(self.worker, signal.SIGKILL)

    def stop(self) -> None:
        self.stop_api()
        for worker in self.workers:  # every worker this service started, not only the newest
            _stop(worker, signal.SIGKILL)

    def logs(self, which: str) -> str:
        path = self.log_dir / f"{which}.log"
        return path.read_text(errors="replace")[-6000:] if path.exists() else ""

    # HTTP helpers
    def get(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30, **kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.post(self.url + path, timeout=60, **kw)

    def wait_for(self, job_id: str, statuses: set[str], timeout: float = 180) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        body: dict[str, Any] = {}
        while time.monotonic() < deadline:
            body = self.get(f"/jobs/{job_id}").json()
            if body.get("status") in statuses:
                return body
            time.sleep(0.25)
        raise AssertionError(f"job {job_id} never reached {statuses}; last {body}\nworker log:\n{self.logs('worker')}")
