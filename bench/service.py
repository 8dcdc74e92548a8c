"""Service overhead: `GET /status` under many clients while a job trains, and API memory during a big upload.

    python -m bench.service [--clients 100] [--duration 20] [--upload-mb 200] [--json OUT]
                            [--skip-load] [--skip-upload]

Everything runs on this machine and talks only to 127.0.0.1: an embedded Redis-compatible server,
the API (uvicorn) and one Celery worker as child processes, and a tiny random model built locally
(nothing is downloaded). It prints figures; it asserts nothing beyond sanity.

Load: a job trains the tiny model for many epochs; `--clients` asyncio tasks, each on its own
keep-alive connection, send `GET /status` back to back for `--warmup` + `--duration` seconds (the
warm-up is not counted). The worker's throughput is read from the job's own progress (real tokens
and loop seconds at two instants, on the worker's clock) over a quiet window and over the load
window; CPU use of each process comes from /proc.

Upload: a valid ~`--upload-mb` MiB chat JSONL file is written to disk and streamed to `POST /train`
while the API process tree's RSS is sampled every 50 ms. The worker is stopped first, so the
accepted job stays queued; it is cancelled at once.

Every child process and temp file is removed at the end, also on Ctrl+C or SIGTERM.
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
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from launcher.embedded_redis import EmbeddedRedis
from tests.data import easy_records, write_jsonl
from tests.service import Service

MIB = 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")
ENDED = {"succeeded", "failed", "cancelled"}
T = TypeVar("T")

# --------------------------------------------------------------------------- /proc: RSS and CPU of process trees


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the `(comm)` field: state, ppid, ... (comm may hold spaces)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants that are alive now."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                children.setdefault(int(_stat_fields(int(entry.name))[1]), []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def rss_bytes(pid: int) -> int:
    """VmRSS of one process (0 when it is gone)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def tree_rss_bytes(root: int, *, tree: bool = True) -> int:
    return sum(rss_bytes(pid) for pid in (process_tree(root) if tree else [root]))


def tree_cpu_seconds(root: int, *, tree: bool = True) -> float:
    """User + system CPU time of `root` and (`tree`) its live descendants, plus children they reaped."""
    total = 0
    for pid in process_tree(root) if tree else [root]:
        with contextlib.suppress(OSError, ValueError, IndexError):
            f = _stat_fields(pid)
            total += sum(int(x) for x in f[11:15])  # utime, stime, cutime, cstime
    return total / CLK_TCK


class RssSampler:
    """Samples (monotonic time, RSS of a process tree) every `interval` seconds in a thread."""

    def __init__(self, root: int, *, tree: bool = True, interval: float = 0.05) -> None:
        self.root, self.tree, self.interval = root, tree, interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), tree_rss_bytes(self.root, tree=self.tree)))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def between(self, start: float, end: float) -> list[int]:
        return [rss for t, rss in self.samples if start <= t <= end]


# --------------------------------------------------------------------------- the stack under test


@dataclass
class Stack:
    tmp: Path
    redis: EmbeddedRedis
    service: Service
    model_dir: Path


@contextlib.contextmanager
def running_stack(upload_mb: float) -> Iterator[Stack]:
    """Temp dir, embedded Redis, the API (no worker yet) and the tiny model; all removed on exit."""
    tmp = Path(tempfile.mkdtemp(prefix="lora-bench-service-"))
    redis_server = EmbeddedRedis(tmp / "redis", persist=False)
    limits = {"LORA_MAX_UPLOAD_MB": str(max(512, int(upload_mb * 2))), "LORA_MAX_RECORDS": "100000000",
              "LORA_MODELS_DIR": str(tmp / "models")}  # fmt: skip
    service = Service(base_path=tmp / "base", redis_url="", log_dir=tmp / "logs", env_extra=limits)
    try:
        redis_server.start()
        service.redis_url = redis_server.url
        service.base_path.mkdir(parents=True)
        service.log_dir.mkdir(parents=True)
        service.start_api()
        model_dir = tmp / "models" / "tiny_model"  # in the service's models directory (LORA_MODELS_DIR)
        build = [sys.executable, "-m", "tests.fixtures.tiny_model", str(model_dir)]
        subprocess.run(build, check=True, capture_output=True, env=service.env())  # torch stays out of this process
        yield Stack(tmp, redis_server, service, model_dir)
    except Exception:
        for which in ("api", "worker"):
            if service.logs(which):
                print(f"--- {which} log (tail) ---\n{service.logs(which)[-3000:]}", file=sys.stderr)
        raise
    finally:
        service.kill_worker_tree()  # SIGKILL: a SIGTERM'd Celery worker would wait for its training task
        service.stop_api()
        redis_server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _on_sigterm(signum: int, frame: object) -> None:
    """Treat SIGTERM as Ctrl+C: through the SIGINT handler in force (asyncio's cancels the load cleanly)."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        raise KeyboardInterrupt(f"signal {signum}")
    signal.raise_signal(signal.SIGINT)


# --------------------------------------------------------------------------- the training job and its clock


@dataclass(frozen=True)
class WorkerClock:
    """A job's progress at one step: real tokens trained and seconds in the training loop (worker's clock)."""

    step: int
    tokens: float
    loop_s: float


def worker_clock(service: Service, job_id: str) -> WorkerClock:
    """From the job's progress: loop seconds are its `elapsed_seconds`, tokens/s is tokens / loop seconds."""
    p = service.get(f"/jobs/{job_id}").json()["progress"]
    step, total = int(p["current_step"]), int(p["total_steps"])
    if step == 0 or step >= total or p.get("elapsed_seconds") is None:
        raise RuntimeError(f"job {job_id} is not mid-training: {p}")
    loop_s = float(p["elapsed_seconds"])
    return WorkerClock(step, float(p["tokens_per_second"]) * loop_s, loop_s)


def throughput(a: WorkerClock, b: WorkerClock) -> dict[str, float]:
    seconds = b.loop_s - a.loop_s
    return {
        "steps": b.step - a.step,
        "loop_seconds": seconds,
        "steps_per_second": (b.step - a.step) / seconds if seconds > 0 else 0.0,
        "tokens_per_second": (b.tokens - a.tokens) / seconds if seconds > 0 else 0.0,
    }


def start_training(stack: Stack) -> str:
    """Submit a job that trains the tiny model far longer than the benchmark runs; wait until it steps."""
    data = write_jsonl(stack.tmp / "train.jsonl", easy_records(32))
    config = {"model_name": str(stack.model_dir), "epochs": 5000, "batch_size": 4, "learning_rate": 1e-3}
    with data.open("rb") as f:
        r = stack.service.post("/train", data={"config": json.dumps(config)}, files={"file": ("train.jsonl", f)})
    if r.status_code != 202:
        raise RuntimeError(f"POST /train answered {r.status_code}: {r.text}")
    job_id = str(r.json()["job_id"])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        body = stack.service.get(f"/jobs/{job_id}").json()
        if body["status"] in ENDED:
            raise RuntimeError(f"training job ended early: {body['status']} {body.get('error')}")
        if body["progress"]["current_step"] >= 20:  # past the first, slower steps
            return job_id
        time.sleep(0.2)
    raise RuntimeError("training job did not reach step 20 within 120 s")


def cancel_and_wait(service: Service, job_id: str) -> str:
    r = service.post(f"/jobs/{job_id}/cancel")
    if r.status_code not in (200, 202):
        raise RuntimeError(f"cancel answered {r.status_code}: {r.text}")
    return str(service.wait_for(job_id, ENDED, timeout=120)["status"])


# --------------------------------------------------------------------------- load generator


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)  # seconds, requests started after the warm-up
    errors: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)  # the `status` field of the bodies
    counted_from: float = 0.0
    last_end: float = 0.0


async def _client(http: httpx.AsyncClient, deadline: float, out: LoadResult) -> None:
    while (start := time.perf_counter()) < deadline:
        error = None
        try:
            r = await http.get("/status")
            if r.status_code == 200:
                out.statuses[str(r.json().get("status"))] += 1
            else:
                error = f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            error = type(exc).__name__
        end = time.perf_counter()
        if start >= out.counted_from:
            out.latencies.append(end - start)
            out.last_end = max(out.last_end, end)
            if error:
                out.errors[error] += 1
        if error:
            await asyncio.sleep(0.01)  # no hot loop on a refused connection


async def generate_load(url: str, clients: int, duration: float, warmup: float) -> LoadResult:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    out = LoadResult()
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as http:
        now = time.perf_counter()
        out.counted_from = now + warmup
        await asyncio.gather(*(_client(http, now + warmup + duration, out) for _ in range(clients)))
    return out


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an ascending sequence."""
    if not sorted_values:
        return float("nan")
    rank = max(1, round(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize_load(result: LoadResult, clients: int, duration: float) -> dict[str, Any]:
    lat = sorted(result.latencies)
    seconds = max(result.last_end - result.counted_from, 1e-9)
    return {
        "clients": clients,
        "duration_s": duration,
        "requests": len(lat),
        "requests_per_second": len(lat) / seconds,
        "errors": sum(result.errors.values()),
        "error_kinds": dict(result.errors),
        "status_fields": dict(result.statuses),
        "latency_ms": {f"p{q}": percentile(lat, q) * 1000 for q in (50, 90, 99)}
        | {"max": lat[-1] * 1000 if lat else 0.0},
    }


# --------------------------------------------------------------------------- phase 1: load while training


def _cpu(stack: Stack) -> dict[str, float]:
    svc = stack.service
    assert svc.api and svc.worker and stack.redis.proc
    return {
        "api": tree_cpu_seconds(svc.api.pid),
        "worker": tree_cpu_seconds(svc.worker.pid),
        "redis": tree_cpu_seconds(stack.redis.proc.pid),
        "load_generator": tree_cpu_seconds(os.getpid(), tree=False),  # the services are our children
    }


def _cpu_percent(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    return {name: 100 * (after[name] - before[name]) / seconds for name in before}


def measure_window(stack: Stack, job_id: str, action: Callable[[], T]) -> tuple[T, dict[str, Any]]:
    """Run `action`; return its value and the job's throughput and each process's CPU use meanwhile."""
    clock_a, cpu_a, t_a = worker_clock(stack.service, job_id), _cpu(stack), time.monotonic()
    value = action()
    clock_b, cpu_b, t_b = worker_clock(stack.service, job_id), _cpu(stack), time.monotonic()
    window: dict[str, Any] = {**throughput(clock_a, clock_b), "step_from": clock_a.step, "step_to": clock_b.step}
    window["cpu_percent"] = _cpu_percent(cpu_a, cpu_b, t_b - t_a)
    window["loadavg_1m"] = os.getloadavg()[0]  # the whole machine: other users' processes show here
    return value, window


def load_phase(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    svc = stack.service
    assert svc.api is not None
    svc.start_worker()
    job_id = start_training(stack)
    rss_before = tree_rss_bytes(svc.api.pid)
    windows: dict[str, dict[str, Any]] = {}
    _, windows["quiet before"] = measure_window(stack, job_id, lambda: time.sleep(args.quiet))

    def load() -> LoadResult:
        return asyncio.run(generate_load(svc.url, args.clients, args.duration, args.warmup))

    result, windows["under load"] = measure_window(stack, job_id, load)
    _, windows["quiet after"] = measure_window(stack, job_id, lambda: time.sleep(args.quiet))
    summary = summarize_load(result, args.clients, args.duration)
    summary["api_rss_mib"] = {"before": rss_before / MIB, "after": tree_rss_bytes(svc.api.pid) / MIB}
    summary["training"] = {"job_id": job_id, "windows": windows, "final_status": cancel_and_wait(svc, job_id)}
    svc.stop_worker()  # the upload phase wants no worker picking up its job
    return summary


# --------------------------------------------------------------------------- phase 2: API memory during an upload

_WORDS = [
    "the", "a", "model", "learns", "to", "answer", "short", "questions", "about", "weather", "numbers",
    "colors", "animals", "cities", "rivers", "trains", "books", "music", "food", "water", "time",
    "people", "every", "morning", "evening", "quickly", "slowly", "because", "however", "small", "large",
    "bright", "quiet", "warm", "cold", "fine-tuning", "adapter", "layer", "token", "sentence", "example",
    "assistant", "user",
]  # fmt: skip


def write_dataset(path: Path, target_bytes: int, seed: int = 0) -> int:
    """Stream valid chat JSONL records (~1 KiB each) to `path` until it holds `target_bytes`; return the count."""
    rng = random.Random(seed)
    pool = [" ".join(rng.choices(_WORDS, k=rng.randint(6, 18))).capitalize() + "." for _ in range(2000)]
    written = records = 0
    with path.open("w", encoding="utf-8") as f:
        while written < target_bytes:
            question = " ".join(rng.choices(pool, k=3)) + "?"
            answer = " ".join(rng.choices(pool, k=rng.randint(6, 12)))
            record = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
            line = json.dumps(record) + "\n"
            f.write(line)
            written += len(line.encode())
            records += 1
    return records


def _upload(stack: Stack, path: Path) -> httpx.Response:
    """Stream the file as the `file` part (httpx reads file objects in 64 KiB chunks)."""
    config = {"model_name": str(stack.model_dir), "epochs": 1}
    with path.open("rb") as f:
        files = {"file": ("dataset.jsonl", f, "application/jsonl")}
        return httpx.post(stack.service.url + "/train", data={"config": json.dumps(config)}, files=files, timeout=900)


def upload_phase(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    svc = stack.service
    assert svc.api is not None
    path = stack.tmp / "upload.jsonl"
    records = write_dataset(path, int(args.upload_mb * MIB))
    size = path.stat().st_size
    client = RssSampler(os.getpid(), tree=False)  # this process only: the services are its children
    with RssSampler(svc.api.pid) as api, client:
        time.sleep(args.settle)
        start = time.monotonic()
        response = _upload(stack, path)
        end = time.monotonic()
        time.sleep(args.settle)
    if response.status_code != 202:
        raise RuntimeError(f"upload answered {response.status_code}: {response.text[:500]}")
    cancelled = svc.post(f"/jobs/{response.json()['job_id']}/cancel").json().get("status")
    path.unlink()
    return _upload_summary(api, client, start, end, size=size, records=records, cancelled=str(cancelled))


def _upload_summary(
    api: RssSampler, client: RssSampler, start: float, end: float, *, size: int, records: int, cancelled: str
) -> dict[str, Any]:
    baseline = statistics.median(api.between(0, start))
    peak = max(api.between(start, float("inf")))
    client_growth = max(client.between(start, end)) - statistics.median(client.between(0, start))
    return {
        "file_mib": size / MIB,
        "records": records,
        "upload_seconds": end - start,
        "mib_per_second": size / MIB / (end - start),
        "api_rss_mib": {"baseline": baseline / MIB, "peak": peak / MIB, "after": api.samples[-1][1] / MIB},
        "growth_mib": (peak - baseline) / MIB,
        "growth_percent_of_file": 100 * (peak - baseline) / size,
        "client_rss_growth_mib": client_growth / MIB,
        "samples": len(api.samples),
        "job_after_cancel": cancelled,
    }


# --------------------------------------------------------------------------- report


def print_load(r: dict[str, Any], warmup: float) -> None:
    lat, tr = r["latency_ms"], r["training"]
    print(f"\n== GET /status: {r['clients']} clients, {r['duration_s']:g} s (+{warmup:g} s warm-up), a job training ==")
    print(f"requests          {r['requests']:,}  ({r['requests_per_second']:,.0f} req/s)")
    print(f"errors            {r['errors']}  {r['error_kinds'] or ''}")
    print(
        f"latency (ms)      p50 {lat['p50']:.1f}   p90 {lat['p90']:.1f}   p99 {lat['p99']:.1f}   max {lat['max']:.1f}"
    )
    print(f"/status bodies    {r['status_fields']}")
    print(f"API RSS           {r['api_rss_mib']['before']:.1f} MiB before, {r['api_rss_mib']['after']:.1f} MiB after")
    print(f"\ntraining job (worker's own clock; job cancelled afterwards: {tr['final_status']})")
    names = list(next(iter(tr["windows"].values()))["cpu_percent"])
    print(f"{'window':<14}{'steps':>13}{'steps/s':>9}{'tokens/s':>10}   CPU % of one core: "
          + " ".join(f"{n:>6.6}" for n in names) + "   load avg")  # fmt: skip
    for name, w in tr["windows"].items():
        cpu = " ".join(f"{w['cpu_percent'][n]:>6.0f}" for n in names)
        steps = f"{w['step_from']}->{w['step_to']}"
        print(f"{name:<14}{steps:>13}{w['steps_per_second']:>9.1f}{w['tokens_per_second']:>10,.0f}"
              f"   {'':19}{cpu}   {w['loadavg_1m']:8.1f}")  # fmt: skip


def print_upload(r: dict[str, Any]) -> None:
    rss = r["api_rss_mib"]
    print(f"\n== API memory during a {r['file_mib']:.0f} MiB upload (POST /train, streamed) ==")
    print(f"file              {r['file_mib']:.1f} MiB, {r['records']:,} records (JSONL)")
    print(
        f"upload            {r['upload_seconds']:.1f} s, {r['mib_per_second']:.1f} MiB/s (until 202, validation included)"
    )
    print(f"API RSS           baseline {rss['baseline']:.1f} MiB, peak {rss['peak']:.1f} MiB, after {rss['after']:.1f} MiB "
          f"({r['samples']} samples, 50 ms)")  # fmt: skip
    print(f"growth            {r['growth_mib']:.1f} MiB = {r['growth_percent_of_file']:.2f} % of the file")
    print(f"client RSS growth {r['client_rss_growth_mib']:.1f} MiB; queued job after cancel: {r['job_after_cancel']}")


# --------------------------------------------------------------------------- driver


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.service", description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=100, help="concurrent /status clients")
    parser.add_argument("--duration", type=float, default=20.0, help="counted seconds of load")
    parser.add_argument("--warmup", type=float, default=2.0, help="uncounted seconds of load first")
    parser.add_argument("--quiet", type=float, default=10.0, help="seconds of training measured without load")
    parser.add_argument("--upload-mb", type=float, default=200.0, help="dataset size in MiB")
    parser.add_argument("--settle", type=float, default=2.0, help="RSS sampling before and after the upload (s)")
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("--skip-upload", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    results: dict[str, Any] = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    print(f"machine: {os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.1f} at start (other processes share these CPUs)")  # fmt: skip
    try:
        with running_stack(args.upload_mb) as stack:
            if not args.skip_load:
                results["load"] = load_phase(stack, args)
                print_load(results["load"], args.warmup)
            if not args.skip_upload:
                results["upload"] = upload_phase(stack, args)
                print_upload(results["upload"])
    except KeyboardInterrupt:
        print("\ninterrupted; child processes and temp files removed", file=sys.stderr)
        return 130
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
