"""Training step time in the one-command mode, idle and while people watch: torch's thread budget vs its default.

    python -m bench.load [--threads N | --no-budget] [--idle-seconds 12] [--load-seconds 12] [--json OUT]

For each configuration it starts the whole service as `lora-server` does (`python -m cli serve`: an embedded
Redis-compatible server, a Celery worker, a generation worker and the API, all on this machine, all on
127.0.0.1), builds a tiny random model locally (nothing is downloaded), submits a long training job and
reads the time of every step from the job's own metrics events (`step_seconds`, on the worker's clock):
the median over a quiet window, then over a window of ordinary polling, rounds of 500 `GET /status` and
200 `GET /v1/fine_tuning/jobs` at concurrency 20 until the window has lasted `--load-seconds`.

Configurations (default: both, one after the other):
  budget         the workers size torch's threads themselves (worker.cpu_budget: a core left for the API)
  torch default  LORA_TORCH_THREADS = torch's own default count (its physical cores): the old behaviour
`--threads N` runs one configuration with LORA_TORCH_THREADS=N; `--no-budget` only the torch default.

It prints figures and asserts nothing. Every process it started and every temp file is removed at the end,
also on Ctrl+C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.service import _stat_fields, percentile, process_tree
from launcher.embedded_redis import free_port
from launcher.process import own_group_dies_with_parent
from tests.data import easy_records, write_jsonl
from worker.cpu_budget import affinity_cores, available_cores, cgroup_cpu_limit

ROOT = Path(__file__).resolve().parent.parent
ENDED = {"succeeded", "failed", "cancelled"}
CLK_TCK = os.sysconf("SC_CLK_TCK")
STATUS_REQUESTS, JOBS_REQUESTS, CONCURRENCY = 500, 200, 20  # one round of polling, as in the issue
ROLES = {"api": "uvicorn", "worker": "celery", "generation": "worker.generation", "redis": "valkey"}


@dataclass(frozen=True)
class Config:
    name: str
    torch_threads: int | None  # LORA_TORCH_THREADS; None: the budget decides


# --------------------------------------------------------------------------- the service, as `lora-server` runs it


def service_env(config: Config, base: Path) -> dict[str, str]:
    # The operator's own thread variables would decide for both configurations: left out.
    drop = {"OMP_NUM_THREADS", "MKL_NUM_THREADS", "LORA_TORCH_THREADS", "LORA_REDIS_URL", "TORCHINDUCTOR_CACHE_DIR"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               LORA_MIN_FREE_DISK_MB="1", LORA_BASE_PATH=str(base), LORA_MODELS_DIR=str(models_dir(base.parent)))  # fmt: skip
    if config.torch_threads is not None:
        env["LORA_TORCH_THREADS"] = str(config.torch_threads)
    return env


@contextlib.contextmanager
def one_command_service(
    config: Config, tmp: Path, extra_args: Sequence[str] = ()
) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    """`python -m cli serve` on a fresh base path and port; its URL, process and log. Stopped on exit."""
    base, port = tmp / f"base-{config.name.replace(' ', '-')}", free_port()
    log_path = tmp / f"serve-{config.name.replace(' ', '-')}.log"
    cmd = [sys.executable, "-m", "cli", "serve", "--base_path", str(base), "--port", str(port), *extra_args]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=service_env(config, base), stdout=log, stderr=log,
                                preexec_fn=own_group_dies_with_parent)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: _ready(url), 180, f"the service to be ready (log: {log_path})", proc)
        yield url, proc, log_path
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the launcher stops the API, the workers, then Redis
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _ready(url: str) -> bool:
    try:
        r = httpx.get(url + "/readyz", timeout=2)
    except httpx.HTTPError:
        return False
    return r.status_code == 200 and bool(r.json().get("workers"))


def _wait(check: Any, timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the service exited (code {proc.returncode}) while waiting for {what}")
        if value := check():
            return value
        time.sleep(0.5)
    raise RuntimeError(f"gave up waiting for {what} after {timeout:.0f} s")


def models_dir(tmp: Path) -> Path:
    """The service's models directory (LORA_MODELS_DIR): a base model must be in one to be accepted."""
    return tmp / "models"


def build_tiny_model(tmp: Path) -> Path:
    out = models_dir(tmp) / "tiny_model"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "tests.fixtures.tiny_model", str(out)], check=True, capture_output=True,
                   env=env, cwd=ROOT)  # fmt: skip
    return out


def default_torch_threads() -> int:
    """torch's own intra-op thread count here, with no thread variable set (what workers ran with before)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    code = "import torch; print(torch.get_num_threads())"
    return int(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              check=True).stdout)  # fmt: skip


# --------------------------------------------------------------------------- the job and its step times


class Job:
    def __init__(self, url: str, job_id: str) -> None:
        self.url, self.id, self.cursor = url, job_id, None
        self.events: list[dict[str, Any]] = []

    def read_events(self) -> None:
        """Every event since the last read."""
        while True:
            params: dict[str, Any] = {"limit": 1000} | ({"after": self.cursor} if self.cursor else {})
            page = httpx.get(f"{self.url}/jobs/{self.id}/events", params=params, timeout=30).json()
            self.events += page["data"]
            self.cursor = page["last_id"] or self.cursor
            if not page["has_more"]:
                return

    def step_seconds(self, start: float, end: float) -> list[float]:
        """Wall time of each step that ended in [start, end] (epoch seconds)."""
        return [e["data"]["step_seconds"] for e in self.events if e["type"] == "metrics"
                and start <= e["created_at"] <= end and e["data"].get("step_seconds") is not None]  # fmt: skip

    def torch_threads(self) -> int | None:
        found = [e["data"]["torch_threads"] for e in self.events if "torch_threads" in e["data"]]
        return int(found[0]) if found else None


def start_job(url: str, model_dir: Path, tmp: Path) -> Job:
    """A job that trains far longer than the benchmark runs; returned once it is past its first, slower steps."""
    data = write_jsonl(tmp / "train.jsonl", easy_records(128))
    config = {"model_name": str(model_dir), "epochs": 2000, "batch_size": 4, "learning_rate": 1e-3}
    with data.open("rb") as f:
        r = httpx.post(url + "/train", data={"config": json.dumps(config)}, files={"file": ("train.jsonl", f)},
                       timeout=60)  # fmt: skip
    if r.status_code != 202:
        raise RuntimeError(f"POST /train answered {r.status_code}: {r.text}")
    job = Job(url, str(r.json()["job_id"]))

    def stepping() -> bool:
        body = httpx.get(f"{url}/jobs/{job.id}", timeout=30).json()
        if body["status"] in ENDED:
            raise RuntimeError(f"the training job ended early: {body['status']} {body.get('error')}")
        return bool(body["progress"]["current_step"] >= 20)

    _wait(stepping, 180, "the job's step 20")
    return job


# --------------------------------------------------------------------------- polling


@dataclass
class Polling:
    rounds: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0


async def _poll_round(http: httpx.AsyncClient, out: Polling, seed: int) -> None:
    paths = ["/status"] * STATUS_REQUESTS + ["/v1/fine_tuning/jobs"] * JOBS_REQUESTS
    random.Random(seed).shuffle(paths)
    queue: asyncio.Queue[str] = asyncio.Queue()
    for path in paths:
        queue.put_nowait(path)

    async def client() -> None:
        while not queue.empty():
            path = queue.get_nowait()
            start = time.perf_counter()
            try:
                r = await http.get(path)
                out.errors += r.status_code != 200
            except httpx.HTTPError:
                out.errors += 1
            out.latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
    out.rounds += 1


async def poll(url: str, seconds: float) -> Polling:
    """Rounds of polling until `seconds` have passed (the round in progress then is finished)."""
    out = Polling()
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as http:
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            await _poll_round(http, out, out.rounds)
        out.seconds = time.monotonic() - start
    return out


# --------------------------------------------------------------------------- CPU use of the service's processes


def cpu_by_role(root: int) -> dict[str, float]:
    """CPU seconds (user + system, live processes) of the API, the workers, the generation worker and Redis."""
    totals = dict.fromkeys(ROLES, 0.0)
    for pid in process_tree(root):
        with contextlib.suppress(OSError, ValueError, IndexError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            role = next((name for name, marker in ROLES.items() if marker in cmdline), None)
            if role is not None:
                totals[role] += sum(int(x) for x in _stat_fields(pid)[11:13]) / CLK_TCK
    return totals


# --------------------------------------------------------------------------- one configuration


def _window(job: Job, start: float, end: float) -> dict[str, Any]:
    times = job.step_seconds(start, end)
    return {"steps": len(times), "median_ms": statistics.median(times) * 1000 if times else float("nan"),
            "p90_ms": percentile(sorted(times), 90) * 1000}  # fmt: skip


def run_config(config: Config, model_dir: Path, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    print(f"\n[{config.name}] starting the service ...", flush=True)
    try:
        return _measure(config, model_dir, tmp, args)
    except Exception:
        log = tmp / f"serve-{config.name.replace(' ', '-')}.log"
        if log.exists():
            print(f"--- service log (tail) ---\n{log.read_text(errors='replace')[-4000:]}", file=sys.stderr)
        raise


def _measure(config: Config, model_dir: Path, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    with one_command_service(config, tmp) as (url, proc, _log):
        job = start_job(url, model_dir, tmp)
        job.read_events()
        idle_start = time.time()
        time.sleep(args.idle_seconds)
        idle_end = time.time()
        cpu_before, t0 = cpu_by_role(proc.pid), time.monotonic()
        load_start = time.time()
        polling = asyncio.run(poll(url, args.load_seconds))
        load_end = time.time()
        cpu_after, t1 = cpu_by_role(proc.pid), time.monotonic()
        job.read_events()
        httpx.post(f"{url}/jobs/{job.id}/cancel", timeout=30)
        lat = sorted(polling.latencies)
        result: dict[str, Any] = {
            "config": config.name,
            "torch_threads": job.torch_threads(),
            "idle": _window(job, idle_start, idle_end),
            "loaded": _window(job, load_start, load_end),
            "polling": {"rounds": polling.rounds, "requests": len(lat), "errors": polling.errors,
                        "requests_per_second": len(lat) / polling.seconds if polling.seconds else 0.0,
                        "p50_ms": percentile(lat, 50) * 1000, "p99_ms": percentile(lat, 99) * 1000},
            "cpu_percent_under_load": {role: 100 * (cpu_after[role] - cpu_before[role]) / (t1 - t0)
                                       for role in ROLES},
        }  # fmt: skip
    result["ratio"] = result["loaded"]["median_ms"] / result["idle"]["median_ms"]
    print(f"[{config.name}] torch threads {result['torch_threads']}: step {result['idle']['median_ms']:.1f} ms idle, "
          f"{result['loaded']['median_ms']:.1f} ms under load ({result['ratio']:.2f}x)", flush=True)  # fmt: skip
    return result


# --------------------------------------------------------------------------- report


def print_table(results: list[dict[str, Any]]) -> None:
    print(f"\n== training step time (median of per-step times), idle and under polling: {STATUS_REQUESTS} GET /status "
          f"+ {JOBS_REQUESTS} GET /v1/fine_tuning/jobs per round, concurrency {CONCURRENCY} ==")  # fmt: skip
    print(f"{'configuration':<15}{'threads':>8}{'idle ms':>9}{'steps':>7}{'loaded ms':>11}{'steps':>7}{'ratio':>8}"
          f"{'rounds':>8}{'req/s':>7}{'p50 ms':>8}{'p99 ms':>8}   CPU % of a core under load")  # fmt: skip
    for r in results:
        p, cpu = r["polling"], r["cpu_percent_under_load"]
        shown = " ".join(f"{role} {cpu[role]:.0f}" for role in ROLES)
        print(f"{r['config']:<15}{r['torch_threads'] or '?':>8}{r['idle']['median_ms']:>9.1f}{r['idle']['steps']:>7}"
              f"{r['loaded']['median_ms']:>11.1f}{r['loaded']['steps']:>7}{r['ratio']:>7.2f}x{p['rounds']:>8}"
              f"{p['requests_per_second']:>7.0f}{p['p50_ms']:>8.1f}{p['p99_ms']:>8.1f}   {shown}")  # fmt: skip
    errors = sum(r["polling"]["errors"] for r in results)
    if errors:
        print(f"({errors} polling requests failed)")


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=(__doc__ or "").split("\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--threads", type=int, default=None, help="only this LORA_TORCH_THREADS")
    which.add_argument("--no-budget", action="store_true", help="only torch's default thread count (the old way)")
    parser.add_argument("--idle-seconds", type=float, default=12.0, help="quiet window")
    parser.add_argument("--load-seconds", type=float, default=12.0, help="polling window (whole rounds)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser.parse_args(argv)


def configs(args: argparse.Namespace) -> list[Config]:
    if args.threads is not None:
        return [Config(f"threads={args.threads}", args.threads)]
    default = Config("torch default", default_torch_threads())
    return [default] if args.no_budget else [Config("budget", None), default]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    quota = cgroup_cpu_limit()
    print(f"machine: {os.cpu_count()} CPUs, affinity {affinity_cores()}, cgroup quota "
          f"{f'{quota:g} CPUs' if quota else 'none'} -> {available_cores()} cores; {platform.platform()}, "
          f"Python {platform.python_version()}; load average {os.getloadavg()[0]:.1f} at start "
          "(other processes share these CPUs)", flush=True)  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="lora-bench-load-"))
    results: list[dict[str, Any]] = []
    try:
        model_dir = build_tiny_model(tmp)
        for config in configs(args):
            results.append(run_config(config, model_dir, tmp, args))
    except KeyboardInterrupt:
        print("\ninterrupted; child processes and temp files removed", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
