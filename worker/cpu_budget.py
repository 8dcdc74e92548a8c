"""How many CPU threads torch may use in a training or generation worker: the cores this process really has,
less what the API and Redis need when they run on the same host.

torch sizes its intra-op pool from the machine's physical cores; it does not look at the process's CPU
affinity or its cgroup's CPU quota (a container limited to 2 CPUs on a 64-core host gets 32 threads), nor at
the other processes of the one-command mode (`launcher.serve`). A training step whose threads all spin on the
cores the API needs to answer `/status` waits for the slowest of them: on a 2-core host, polling at
concurrency 20 made a tiny model's step 25-29x slower with torch's default 2 threads, 1.1x with 1; with
other load on the machine too, torch's 2 threads were 8-16x slower than 1 even with no polling
(`python -m bench.load` prints both configurations). So:

    threads = max(1, (cores - reserved) // workers_on_host)

`cores` is the affinity set capped by the cgroup quota; `reserved` is 0 unless the API shares the host
(`Settings.api_on_host`, which the launcher sets), then 1 core (2 from 16 cores on): the API is one uvicorn
process (one event loop, so at most about a core of Python) and Redis is single-threaded. LORA_TORCH_THREADS
overrides it all; an OMP_NUM_THREADS the operator set is kept.

`configure` applies it in a worker process before torch loads (the pool child's start, the generation
worker's main): it sets OMP_NUM_THREADS and MKL_NUM_THREADS, which the OpenMP and MKL runtimes read as torch
is imported; `apply_to_torch`, called once torch is loaded (a run's setup, the generation worker's model
cache), calls `torch.set_num_threads` with it. Nothing here imports torch.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from shared.settings import Settings

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # read by the OpenMP and MKL runtimes as torch loads them
LARGE_HOST_CORES = 16  # from here on, two cores are kept for the API and Redis


def affinity_cores() -> int:
    """CPUs this process may be scheduled on (its affinity set), else the machine's count."""
    count = getattr(os, "process_cpu_count", None)  # 3.13+
    if count is not None:
        return int(count() or 1)
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _v2_limit(cpu_max: Path) -> float | None:
    """`cpu.max` is "QUOTA PERIOD" or "max PERIOD" (no limit)."""
    text = _read(cpu_max)
    parts = text.split() if text else []
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_limit(folder: Path) -> float | None:
    """cgroup v1: cpu.cfs_quota_us (-1: no limit) over cpu.cfs_period_us."""
    quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
    try:
        q, p = int(quota or ""), int(period or "")
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def _own_paths(self_cgroup: Path) -> tuple[str | None, str | None]:
    """This process's cgroup path in the v2 hierarchy and in v1's cpu controller (from /proc/self/cgroup)."""
    v2 = v1 = None
    for line in (_read(self_cgroup) or "").splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _with_parents(base: Path, path: str | None) -> list[Path]:
    """`base`/`path` and each folder above it up to `base` (a limit anywhere on the way applies)."""
    folders = [base]
    if path:
        parts = [p for p in path.split("/") if p and p not in (".", "..")]
        folders += [base.joinpath(*parts[:n]) for n in range(1, len(parts) + 1)]
    return folders


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> float | None:
    """CPUs the tightest cgroup quota on this process's path allows (quota / period), or None where none is set.

    v2: `cpu.max` in the process's cgroup and those above it (in a container with its own cgroup namespace,
    the root is the container's own). v1: `cpu.cfs_quota_us` in the cpu controller's mount (`cpu`, or
    `cpu,cpuacct`), at the root of the mount and along the process's path.
    """
    v2_path, v1_path = _own_paths(self_cgroup)
    limits = [limit for d in _with_parents(root, v2_path) if (limit := _v2_limit(d / "cpu.max")) is not None]
    for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        if (root / mount).is_dir():
            folders = _with_parents(root / mount, v1_path)
            limits += [limit for d in folders if (limit := _v1_limit(d)) is not None]
    return min(limits, default=None)


def available_cores(affinity: int | None = None, root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> int:
    """Whole cores this process can use: its affinity set capped by its cgroup quota (a 1.5-CPU quota is 1)."""
    cores = affinity if affinity is not None else affinity_cores()
    limit = cgroup_cpu_limit(root, self_cgroup)
    if limit is not None:
        cores = min(cores, math.floor(limit))
    return max(1, cores)


def reserved_cores(cores: int, api_on_host: bool) -> int:
    """Cores kept for the API and Redis where they share the host: 1, or 2 from `LARGE_HOST_CORES` on."""
    if not api_on_host:
        return 0
    return 2 if cores >= LARGE_HOST_CORES else 1


@dataclass(frozen=True)
class ThreadBudget:
    """torch's intra-op threads for one worker process, and how they were chosen."""

    threads: int
    cores: int  # available to this process (affinity, cgroup quota)
    reserved: int  # of those, kept for the API and Redis on this host
    workers: int  # training workers sharing the rest
    source: Literal["auto", "LORA_TORCH_THREADS", "OMP_NUM_THREADS"]

    def describe(self) -> str:
        if self.source != "auto":
            return f"torch threads: {self.threads} (set by {self.source}; cores available {self.cores})"
        shared = f", shared by {self.workers} workers" if self.workers > 1 else ""
        return (
            f"torch threads: {self.threads} (cores available {self.cores}, reserved {self.reserved} for the API "
            f"on this host{shared})"
        )


def _positive_int(text: str | None) -> int | None:
    try:
        value = int((text or "").strip())
    except ValueError:
        return None
    return value if value > 0 else None


def plan_threads(
    *,
    setting: int = 0,
    api_on_host: bool = False,
    workers_on_host: int = 1,
    environ: Mapping[str, str] | None = None,
    cores: int | None = None,
) -> ThreadBudget:
    """The budget: `setting` (LORA_TORCH_THREADS) when positive, else an OMP_NUM_THREADS already in
    `environ` (the operator's choice), else sized from `cores` (default: `available_cores()`)."""
    env = os.environ if environ is None else environ
    have = cores if cores is not None else available_cores()
    workers = max(1, workers_on_host)
    if setting > 0:
        return ThreadBudget(setting, have, 0, workers, "LORA_TORCH_THREADS")
    if (omp := _positive_int(env.get("OMP_NUM_THREADS"))) is not None:
        return ThreadBudget(omp, have, 0, workers, "OMP_NUM_THREADS")
    reserved = reserved_cores(have, api_on_host)
    return ThreadBudget(max(1, (have - reserved) // workers), have, reserved, workers, "auto")


def thread_env(budget: ThreadBudget, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to set before torch loads: both, to the budget, unless the operator set them (an explicit
    LORA_TORCH_THREADS replaces them)."""
    return {
        name: str(budget.threads)
        for name in THREAD_VARS
        if budget.source == "LORA_TORCH_THREADS" or _positive_int(environ.get(name)) is None
    }


_configured: ThreadBudget | None = None  # this process's budget, once `configure` ran


def configure(settings: Settings, environ: MutableMapping[str, str] | None = None) -> ThreadBudget:
    """Plan this worker process's torch threads from `settings`, apply them, and log the decision once."""
    global _configured
    env = os.environ if environ is None else environ
    budget = plan_threads(setting=settings.torch_threads, api_on_host=settings.api_on_host,
                          workers_on_host=settings.workers_on_host, environ=env)  # fmt: skip
    env.update(thread_env(budget, env))
    _configured = budget
    apply_to_torch()
    log.info("%s", budget.describe())
    return budget


def apply_to_torch() -> None:
    """Give torch the configured budget, where torch is loaded and `configure` ran (else nothing: a library call
    keeps torch's own choice). Called where a job or the generation worker has loaded torch: the variables alone
    only ever lower torch's default (it never starts more threads than the cores it counts)."""
    torch = sys.modules.get("torch")
    if _configured is None or torch is None or not hasattr(torch, "set_num_threads"):
        return
    if torch.get_num_threads() != _configured.threads:
        torch.set_num_threads(_configured.threads)
