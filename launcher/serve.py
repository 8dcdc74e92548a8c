"""One-machine mode: an embedded Redis (unless one is named), the Celery worker(s), a generation worker
next to each (chat completions), and the API.

Each child runs in its own process group so that stopping reaches its whole tree (Celery's
prefork children included). The launcher is a supervisor: a worker or the API that dies on its own
(an out-of-memory kill, say) is started again, with exponential backoff, while everything else stays
up; a job the dead worker held is settled by its lease (run again from its saved state while attempts
allow). Ctrl+C or SIGTERM stops the API first, then the workers (a running job saves its state and goes
back to the queue, first in line), then Redis, and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from pydantic import ValidationError

from launcher.banner import BannerFacts, ReadyWatch, api_url, gpu_names, ready_banner, worker_devices
from launcher.embedded_redis import EmbeddedRedis
from launcher.process import own_group_dies_with_parent
from shared import generation_queue as gq
from shared.settings import Settings
from shared.store import connect
from shared.tasks import QUEUE

log = logging.getLogger("lora-server")


@dataclass
class ServeOptions:
    base_path: Path
    host: str = "127.0.0.1"
    port: int = 8000
    redis_url: str | None = None
    gpus: list[str] | None = None  # one worker per listed GPU, pinned with CUDA_VISIBLE_DEVICES
    workers: int = 1
    log_level: str = "info"
    # How long the API and the workers get to come up before the launcher says which one has not (a first
    # start on a busy machine imports torch in every worker).
    ready_timeout_s: float = 180.0


def _stop(name: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        log.warning("%s did not stop within %.0f s; killing it", name, timeout)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
    # Whatever it left in its group (a prefork child mid-job) goes too.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


# A worker asked to stop saves its job's full state and hands the job back (`worker.jobs.shutdown`): for a
# large model that write takes a while, and cutting it short would lose the steps since the last save.
WORKER_STOP_GRACE_S = 120.0
OTHER_STOP_GRACE_S = 15.0

RESTART_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)  # then 30 s between tries
STABLE_AFTER_S = 60.0  # a child up this long starts its backoff afresh


@dataclass
class Child:
    """A supervised process: how to start it, the running process, and its restart history."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    stop_grace_s: float = OTHER_STOP_GRACE_S
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0  # consecutive restarts without a stable run in between
    restart_at: float | None = None  # when a dead child is due to start again

    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd, env=self.env, preexec_fn=own_group_dies_with_parent)
        self.started_at, self.restart_at = time.monotonic(), None

    def supervise(self, now: float) -> None:
        """Start again a child that died on its own, once its backoff has passed."""
        if self.restart_at is not None:
            if now >= self.restart_at:
                log.info("starting %s again (restart %d)", self.name, self.restarts)
                self.start()
            return
        if self.proc is None or self.proc.poll() is None:
            return
        if now - self.started_at >= STABLE_AFTER_S:
            self.restarts = 0
        delay = RESTART_BACKOFF_S[min(self.restarts, len(RESTART_BACKOFF_S) - 1)]
        self.restarts += 1
        log.error("%s exited with code %s; restarting it in %.0f s", self.name, self.proc.returncode, delay)
        self.restart_at = now + delay


def _cli_command() -> str:
    """How to run the CLI from the current directory: by name when it is on PATH, else by its path (the venv's)."""
    if shutil.which("lora-server"):
        return "lora-server"
    beside = Path(sys.executable).parent / "lora-server"
    if not beside.exists():
        return f"{sys.executable} -m cli"
    with contextlib.suppress(ValueError):
        return str(beside.relative_to(Path.cwd()))
    return str(beside)


def serve(opts: ServeOptions) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        settings = (
            Settings()
        )  # a bad LORA_* setting (a malformed webhook secret, say) is told once here, not as a restart loop
    except ValidationError as exc:
        log.error("configuration error: %s", exc)
        return 2
    base = opts.base_path.resolve()
    base.mkdir(parents=True, exist_ok=True)
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    redis_server: EmbeddedRedis | None = None
    redis_url = opts.redis_url or os.environ.get("LORA_REDIS_URL")
    if not redis_url:
        redis_server = EmbeddedRedis(base / ".redis").start()
        redis_url = redis_server.url
        log.info("embedded Redis-compatible server on %s (data in %s)", redis_url, base / ".redis")

    gpus = opts.gpus or [None] * opts.workers  # type: ignore[list-item]
    env = dict(os.environ, LORA_BASE_PATH=str(base), LORA_REDIS_URL=redis_url)
    # The workers' torch sizes its threads from these (worker.cpu_budget): a core stays free for the API.
    env.setdefault("LORA_API_ON_HOST", "true")
    env.setdefault("LORA_WORKERS_ON_HOST", str(len(gpus)))

    children: list[Child] = []
    prefixes: list[tuple[str, str | None]] = []  # each worker's node-name prefix and the GPU it is pinned to
    generators: list[str] = []  # the generation workers' names (their heartbeats are in Redis)
    for i, gpu in enumerate(gpus):
        worker_env = dict(env)
        if gpu is not None:
            worker_env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        cmd = [
            sys.executable, "-m", "celery", "-A", "worker.jobs.celery_app", "worker",
            "--loglevel", opts.log_level.upper(), "--concurrency", "1", "--pool", "prefork",
            "-Q", QUEUE, "-n", f"gpu{gpu if gpu is not None else i}@%h",
        ]  # fmt: skip
        prefixes.append((f"gpu{gpu if gpu is not None else i}", None if gpu is None else str(gpu)))
        children.append(Child(f"worker {i}", cmd, worker_env, stop_grace_s=WORKER_STOP_GRACE_S))
        # Its generation worker: same GPU, its own long-lived process, so chat never holds up training.
        generators.append(f"generate{gpu if gpu is not None else i}")
        generate_cmd = [sys.executable, "-m", "worker.generation", "--name", generators[-1]]
        children.append(Child(f"generation worker {i}", generate_cmd, worker_env))
    api_cmd = [
        sys.executable, "-m", "uvicorn", "api.main:create_app", "--factory",
        "--host", opts.host, "--port", str(opts.port), "--log-level", opts.log_level,
    ]  # fmt: skip
    children.append(Child("api", api_cmd, env))

    def generators_pending() -> list[str]:
        try:
            client = connect(redis_url, timeout=1)
            try:
                return [f"{name} (chat completions)" for name in generators if not gq.reported_lately(client, name)]
            finally:
                client.close()
        except redis.RedisError as exc:
            return [f"Redis ({exc})"]

    def print_banner(workers: list[str] | None, pending: list[str]) -> None:
        facts = BannerFacts(
            host=opts.host,
            port=opts.port,
            base_path=base,
            redis_url=redis_url,
            redis_embedded=redis_server is not None,
            workers=workers,
            devices=worker_devices(prefixes, gpu_names(), os.environ.get("CUDA_VISIBLE_DEVICES")),
            api_key_set=bool(settings.api_key),
            expected_workers=len(gpus),
            pending=pending,
            cli=_cli_command(),
        )
        # stdout, after the children's start-up noise (theirs goes to stderr mostly, and is done by now).
        print("\n" + ready_banner(facts) + "\n", flush=True)

    def say_late(missing: str) -> None:
        log.error("not ready yet: %s; still waiting (the banner follows once it is)", missing)

    watch = ReadyWatch(
        url=api_url(opts.host, opts.port),
        api_key=settings.api_key,
        expected_workers=len(gpus),
        timeout_s=opts.ready_timeout_s,
        on_ready=print_banner,
        on_late=say_late,
        pending=generators_pending,
    )
    try:
        for child in children:
            child.start()
        log.info("starting lora-server on %s (base path %s)", api_url(opts.host, opts.port), base)
        watch.started_at = time.monotonic()
        while not stopping:
            if redis_server is not None and not redis_server.alive():
                # Same port, same data (append-only file): the API and workers reconnect on their own.
                log.error("the embedded Redis-compatible server exited; starting it again")
                try:
                    redis_server.start()
                except RuntimeError as exc:
                    log.error("%s; stopping everything", exc)
                    return 1
            now = time.monotonic()
            for child in children:
                child.supervise(now)
            watch.poll(now)
            time.sleep(0.2)
        return 0
    finally:
        log.info("stopping")
        for child in reversed(children):  # the API first, then the workers (their jobs go back to the queue)
            if child.proc is not None:
                _stop(child.name, child.proc, timeout=child.stop_grace_s)
        if redis_server is not None:
            redis_server.stop()
        log.info("stopped")
