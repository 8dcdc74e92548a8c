"""One-machine mode: an embedded Redis (unless one is named), the Celery worker(s) and the API.

Each child runs in its own process group so that stopping reaches its whole tree (Celery's
prefork children included). Ctrl+C or SIGTERM stops the API first, then the workers, then Redis,
and leaves nothing behind. If any child dies on its own, everything is stopped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from launcher.embedded_redis import EmbeddedRedis
from launcher.process import own_group_dies_with_parent
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


def serve(opts: ServeOptions) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
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
    env.setdefault("LORA_MAX_CONCURRENT_JOBS", str(len(gpus)))

    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    try:
        for i, gpu in enumerate(gpus):
            worker_env = dict(env)
            if gpu is not None:
                worker_env["CUDA_VISIBLE_DEVICES"] = str(gpu)
            cmd = [
                sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
                "--loglevel", opts.log_level.upper(), "--concurrency", "1", "--pool", "prefork",
                "-Q", QUEUE, "-n", f"gpu{gpu if gpu is not None else i}@%h",
            ]  # fmt: skip
            children.append(
                (f"worker {i}", subprocess.Popen(cmd, env=worker_env, preexec_fn=own_group_dies_with_parent))
            )
        api_cmd = [
            sys.executable, "-m", "uvicorn", "api.main:create_app", "--factory",
            "--host", opts.host, "--port", str(opts.port), "--log-level", opts.log_level,
        ]  # fmt: skip
        children.append(("api", subprocess.Popen(api_cmd, env=env, preexec_fn=own_group_dies_with_parent)))
        log.info("lora-server on http://%s:%d (base path %s)", opts.host, opts.port, base)
        code = 0
        while not stopping:
            for name, proc in children:
                if proc.poll() is not None:
                    log.error("%s exited with code %s; stopping everything", name, proc.returncode)
                    stopping, code = True, 1
                    break
            time.sleep(0.2)
        return code
    finally:
        log.info("stopping")
        for name, proc in reversed(children):  # the API first, then the workers
            _stop(name, proc, timeout=15.0)
        if redis_server is not None:
            redis_server.stop()
        log.info("stopped")
