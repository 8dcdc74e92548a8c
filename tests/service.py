"""The one helper module for services and waiting.

`Service` runs the real service for process-level tests (uvicorn and Celery workers as child
processes); `wait_until` is the only way tests wait for something (tenacity, no deadline loops);
`submit`/`wait_running` are the steps most of those tests share.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import redis
from tenacity import (
    RetryCallState,
    RetryError,
    Retrying,
    retry_if_exception_type,
    retry_if_result,
    stop_after_delay,
    wait_fixed,
)

from launcher.embedded_redis import free_port
from launcher.process import own_group_dies_with_parent
from shared.settings import Settings
from shared.tasks import QUEUE
from tests.data import easy_records, jsonl
from tests.fixtures.worker_announcement import announced_worker

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


# --------------------------------------------------------------------------- waiting


def wait_until(
    check: Callable[[], T | None],
    *,
    timeout: float,
    every: float = 0.2,
    ignoring: tuple[type[Exception], ...] = (),
    gives_up: Callable[[], bool] | None = None,
    what: str | Callable[[], str] = "the condition",
) -> T:
    """Call `check` until it returns something truthy, and return that.

    Exceptions of the `ignoring` types count as "not yet"; any other (an AssertionError saying the
    state went wrong, say) ends the wait at once. On timeout, or as soon as `gives_up()` is true,
    AssertionError naming `what` (a callable is evaluated then, e.g. to attach a log) and the last result.
    """

    def stop(state: RetryCallState) -> bool:
        return bool(stop_after_delay(timeout)(state) or (gives_up is not None and gives_up()))

    retrying = Retrying(
        stop=stop,
        wait=wait_fixed(every),
        retry=retry_if_result(lambda value: not value) | retry_if_exception_type(ignoring),
    )
    try:
        result = retrying(check)
    except RetryError as exc:
        last = exc.last_attempt
        got = repr(last.exception()) if last.failed else repr(last.result())
        described = what() if callable(what) else what
        raise AssertionError(f"gave up waiting for {described} after {timeout:g} s; last: {got[:2000]}") from None
    assert result is not None  # retried while falsy
    return result


def wait_until_up(url: str, proc: subprocess.Popen[Any], *, timeout: float = 60) -> bool:
    """True once `url` answers 200; False if `proc` exits or time runs out first."""
    try:
        wait_until(
            lambda: httpx.get(url, timeout=2).status_code == 200,
            timeout=timeout,
            ignoring=(httpx.HTTPError,),
            gives_up=lambda: proc.poll() is not None,
            what=url,
        )
    except AssertionError:
        return False
    return True


# --------------------------------------------------------------------------- the service


def flush(redis_url: str) -> None:
    """Empty the Redis database a service is about to use."""
    with redis.Redis.from_url(redis_url) as client:
        client.flushdb()


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
    generator: subprocess.Popen[bytes] | None = None  # the generation worker (chat completions)
    _worker_names: list[str] = field(default_factory=list)
    _held: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # what slot_elsewhere keeps going

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        # torch sets TORCHINDUCTOR_CACHE_DIR in the test process itself once anything asks for its cache
        # folder; passed on, the worker would take it for the operator's choice and not use the volume's.
        env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
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
        self.start_generator()
        self.start_api()
        assert self.worker is not None
        self._wait_announced(self.worker, self._worker_names[-1])

    def health(self) -> dict[str, Any]:
        key = self.env_extra.get("LORA_API_KEY")
        body: dict[str, Any] = self.get("/health", headers={"Authorization": f"Bearer {key}"} if key else {}).json()
        return body

    def wait_slots(self, slots: int, timeout: float = 120) -> dict[str, Any]:
        """Until the live workers bring `slots` training slots (/health): admission counts only announced workers."""
        return wait_until(lambda: (body := self.health())["slots"] >= slots and body, timeout=timeout,
                          ignoring=(httpx.HTTPError,), what=lambda: f"{slots} training slots; worker log:\n" + self.logs("worker"))  # fmt: skip

    def _wait_announced(self, proc: subprocess.Popen[bytes], name: str, timeout: float = 120) -> None:
        """Until the worker `name` has announced itself (it counts for admission from then on)."""
        wait_until(lambda: any(w["name"] == name for w in self.health()["workers"]), timeout=timeout,
                   ignoring=(httpx.HTTPError,), gives_up=lambda: proc.poll() is not None,
                   what=lambda: f"worker {name} to announce itself; its log:\n" + self.logs("worker"))  # fmt: skip

    def slot_elsewhere(self, slots: int = 1) -> None:
        """Training slots announced, until the service stops, by a worker on another host that has not taken its
        message yet: admission counts them, so with this service's own worker stopped, admitted jobs stay queued."""
        client = self._held.enter_context(redis.Redis.from_url(self.redis_url, decode_responses=True))
        settings = Settings(reap_interval_s=float(self.env()["LORA_REAP_INTERVAL_S"]))
        self._held.enter_context(announced_worker(client, settings, slots=slots, name=f"elsewhere{slots}@far"))

    def _a_worker_died(self) -> bool:
        return any(worker.poll() is not None for worker in self.workers)

    def start_api(self) -> None:
        cmd = [sys.executable, "-m", "uvicorn", "api.main:create_app", "--factory", "--host", "127.0.0.1",
               "--port", str(self.port), "--log-level", "warning"]  # fmt: skip
        self.api = self._spawn(cmd, "api", self.env())
        if wait_until_up(self.url + "/healthz", self.api, timeout=30):
            return
        raise RuntimeError("API did not start:\n" + self.logs("api"))

    def start_worker(self, **env: str) -> None:
        """Start a training worker; with the API up, return once it has announced itself (admission counts it)."""
        name = f"test{len(self.workers) + 1}@{socket.gethostname()}"
        cmd = [sys.executable, "-m", "celery", "-A", "worker.jobs.celery_app", "worker", "--loglevel", "INFO",
               "--concurrency", "1", "-Q", QUEUE, "-n", name]  # fmt: skip
        self.worker = self._spawn(cmd, "worker", {**self.env(), **env})
        self.workers.append(self.worker)
        self._worker_names.append(name)
        if self.api is not None and self.api.poll() is None:
            self._wait_announced(self.worker, name)

    def start_generator(self, **env: str) -> None:
        cmd = [sys.executable, "-m", "worker.generation", "--name", f"test-generate{len(self.workers)}"]
        self.generator = self._spawn(cmd, "generator", {**self.env(), **env})

    def _spawn(self, cmd: list[str], log_name: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        """A child in a process group of its own, writing to `<log_name>.log` (the child keeps its own handle)."""
        with (self.log_dir / f"{log_name}.log").open("ab") as log:
            return subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=log, stderr=log, preexec_fn=own_group_dies_with_parent
            )

    def stop_api(self) -> None:
        _stop(self.api)

    def kill_api(self) -> None:
        """SIGKILL the API at once: no lifespan shutdown, no request's own cleanup."""
        _stop(self.api, signal.SIGKILL)

    def stop_worker(self, sig: int = signal.SIGTERM) -> None:
        """Stop the newest worker; with the API up, return once its slot no longer counts (it leaves as it stops;
        one whose stop was too slow is killed, and its announcement then lapses)."""
        _stop(self.worker, sig)
        if self.api is not None and self.api.poll() is None and self._worker_names:
            name = self._worker_names[-1]  # the newest worker's, as `self.worker` is
            wait_until(lambda: all(w["name"] != name for w in self.health()["workers"]), timeout=60,
                       ignoring=(httpx.HTTPError,), what=f"stopped worker {name}'s slot to go")  # fmt: skip

    def kill_worker_tree(self) -> None:
        """SIGKILL the worker and its prefork children at once, like a host losing power."""
        _stop(self.worker, signal.SIGKILL)

    def stop(self) -> None:
        self._held.close()
        self.stop_api()
        for worker in self.workers:  # every worker this service started, not only the newest
            _stop(worker, signal.SIGKILL)
        _stop(self.generator, signal.SIGKILL)

    def logs(self, which: str) -> str:
        path = self.log_dir / f"{which}.log"
        return path.read_text(errors="replace")[-6000:] if path.exists() else ""

    # HTTP helpers
    def get(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30, **kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.post(self.url + path, timeout=60, **kw)

    def job(self, job_id: str) -> dict[str, Any]:
        body: dict[str, Any] = self.get(f"/jobs/{job_id}").json()
        return body

    def wait_for(self, job_id: str, statuses: set[str], timeout: float = 180) -> dict[str, Any]:
        """The job, once its status is one of `statuses`."""

        def reached() -> dict[str, Any] | None:
            job = self.job(job_id)
            return job if job["status"] in statuses else None

        return wait_until(
            reached,
            timeout=timeout,
            every=0.25,
            what=lambda: f"job {job_id} to reach {statuses}: {self.job(job_id)}\nworker log:\n{self.logs('worker')}",
        )

    def wait_for_log(self, text: str, *, which: str = "worker", timeout: float = 30) -> None:
        wait_until(lambda: text in self.logs(which), timeout=timeout, every=0.3, what=lambda: self.logs(which))


# --------------------------------------------------------------------------- jobs


def submit(service: Service, model_dir: Path, **config: Any) -> httpx.Response:
    cfg = {"model_name": str(model_dir), "epochs": 1, **config}
    files = {"config": (None, json.dumps(cfg)), "file": ("d.jsonl", jsonl(easy_records(8)))}
    return service.post("/train", files=files)


def submit_long(service: Service, model_dir: Path, epochs: int = 400) -> str:
    """A job that trains for a while (tens of seconds on this CPU); returns its id."""
    r = submit(service, model_dir, epochs=epochs, batch_size=2)
    assert r.status_code == 202, r.text
    return str(r.json()["job_id"])


def wait_running(service: Service, job_id: str, min_step: int = 2, timeout: float = 120) -> dict[str, Any]:
    """The job, once it is running and has done `min_step` steps; AssertionError at once if it ended."""

    def trained() -> dict[str, Any] | None:
        job = service.job(job_id)
        assert job["status"] in ("queued", "running"), job
        return job if job["status"] == "running" and job["progress"]["current_step"] >= min_step else None

    return wait_until(trained, timeout=timeout, what=lambda: f"job {job_id} to train\n{service.logs('worker')}")


def running_events(service: Service, job_id: str) -> list[dict[str, Any]]:
    events = service.get(f"/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    return [e for e in events if e["type"] == "status" and e["data"]["status"] == "running"]


def assert_chat_served(service: Service) -> None:
    """Fail at once, saying why, where the chat surface (/v1/models, /v1/chat/completions) is not served."""
    probe = service.post(
        "/v1/chat/completions", json={"model": "job-probe", "messages": [{"role": "user", "content": "hi"}]}
    )
    # The chat surface answers an unknown model in OpenAI's envelope; a server without it, FastAPI's bare 404.
    assert probe.status_code not in (404, 405) or "error" in probe.json(), (
        f"needs the chat branch: POST /v1/chat/completions is not served here ({probe.status_code} {probe.text})"
    )
