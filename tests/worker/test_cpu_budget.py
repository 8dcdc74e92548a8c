"""torch's thread budget: the cores a process has (affinity, cgroup v1 and v2 quotas, written here as the
kernel lays them out), the room left for the API on a shared host, and who overrides whom."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from shared.settings import Settings
from worker import cpu_budget
from worker.cpu_budget import ThreadBudget, available_cores, cgroup_cpu_limit, plan_threads, thread_env


def _files(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    return root


def _proc_cgroup(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "proc-self-cgroup"
    path.write_text(text + "\n")
    return path


# --------------------------------------------------------------------------- cgroup quotas


def test_cgroup_v2_quota_in_a_container_namespace(tmp_path: Path) -> None:
    root = _files(tmp_path / "cg", {"cpu.max": "150000 100000"})
    assert cgroup_cpu_limit(root, _proc_cgroup(tmp_path, "0::/")) == 1.5


def test_cgroup_v2_max_is_no_limit(tmp_path: Path) -> None:
    root = _files(tmp_path / "cg", {"cpu.max": "max 100000"})
    assert cgroup_cpu_limit(root, _proc_cgroup(tmp_path, "0::/")) is None


def test_cgroup_v2_tightest_limit_on_the_path_applies(tmp_path: Path) -> None:
    root = _files(
        tmp_path / "cg",
        {
            "cpu.max": "max 100000",
            "system.slice/cpu.max": "300000 100000",
            "system.slice/lora.service/cpu.max": "max 100000",
        },
    )
    assert cgroup_cpu_limit(root, _proc_cgroup(tmp_path, "0::/system.slice/lora.service")) == 3.0


def test_cgroup_v1_quota_over_period(tmp_path: Path) -> None:
    root = _files(
        tmp_path / "cg", {"cpu,cpuacct/cpu.cfs_quota_us": "200000", "cpu,cpuacct/cpu.cfs_period_us": "100000"}
    )
    proc = _proc_cgroup(tmp_path, "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/")
    assert cgroup_cpu_limit(root, proc) == 2.0


def test_cgroup_v1_along_the_process_path(tmp_path: Path) -> None:
    root = _files(
        tmp_path / "cg",
        {
            "cpu/cpu.cfs_quota_us": "-1",
            "cpu/cpu.cfs_period_us": "100000",
            "cpu/docker/abc/cpu.cfs_quota_us": "50000",
            "cpu/docker/abc/cpu.cfs_period_us": "100000",
        },
    )
    assert cgroup_cpu_limit(root, _proc_cgroup(tmp_path, "1:cpu:/docker/abc")) == 0.5


def test_cgroup_v1_minus_one_and_missing_files_are_no_limit(tmp_path: Path) -> None:
    root = _files(tmp_path / "cg", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"})
    assert cgroup_cpu_limit(root, _proc_cgroup(tmp_path, "1:cpu:/")) is None
    assert cgroup_cpu_limit(tmp_path / "nothing", tmp_path / "no-proc-file") is None


def test_garbled_cgroup_files_are_no_limit(tmp_path: Path) -> None:
    root = _files(tmp_path / "cg", {"cpu.max": "lots", "cpu/cpu.cfs_quota_us": "x", "cpu/cpu.cfs_period_us": "0"})
    assert cgroup_cpu_limit(root, _proc_cgroup(tmp_path, "0::/\n1:cpu:/")) is None


# --------------------------------------------------------------------------- cores


def test_cores_are_the_affinity_set_capped_by_the_quota(tmp_path: Path) -> None:
    proc = _proc_cgroup(tmp_path, "0::/")
    limited = _files(tmp_path / "limited", {"cpu.max": "250000 100000"})
    unlimited = _files(tmp_path / "unlimited", {"cpu.max": "max 100000"})
    assert available_cores(64, limited, proc) == 2  # 2.5 CPUs of quota: two whole cores
    assert available_cores(1, limited, proc) == 1  # pinned to one CPU: the quota does not add any
    assert available_cores(8, unlimited, proc) == 8
    tiny = _files(tmp_path / "tiny", {"cpu.max": "20000 100000"})
    assert available_cores(8, tiny, proc) == 1  # a fifth of a CPU still runs one thread


def test_this_process_affinity_is_counted() -> None:
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no sched_getaffinity on this platform")
    assert cpu_budget.affinity_cores() == len(os.sched_getaffinity(0))


# --------------------------------------------------------------------------- the budget


@pytest.mark.parametrize(
    ("cores", "api_on_host", "workers", "threads", "reserved"),
    [
        (2, True, 1, 1, 1),  # the one-command mode on a 2-core host: one core for torch, one for the API
        (1, True, 1, 1, 1),  # never below one thread
        (8, True, 1, 7, 1),
        (8, True, 2, 3, 1),  # two workers split what is left
        (32, True, 4, 7, 2),  # a large host keeps two cores
        (8, False, 1, 8, 0),  # a worker host of its own (a container): every core it has
        (8, False, 3, 2, 0),
    ],
)
def test_auto_budget(cores: int, api_on_host: bool, workers: int, threads: int, reserved: int) -> None:
    budget = plan_threads(api_on_host=api_on_host, workers_on_host=workers, environ={}, cores=cores)
    assert budget == ThreadBudget(threads, cores, reserved, workers, "auto")


def test_the_setting_overrides_everything() -> None:
    budget = plan_threads(setting=3, api_on_host=True, environ={"OMP_NUM_THREADS": "6"}, cores=2)
    assert (budget.threads, budget.source) == (3, "LORA_TORCH_THREADS")
    assert thread_env(budget, {"OMP_NUM_THREADS": "6"}) == {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"}


def test_an_operators_omp_num_threads_is_kept() -> None:
    env = {"OMP_NUM_THREADS": "4"}
    budget = plan_threads(api_on_host=True, environ=env, cores=2)
    assert (budget.threads, budget.source) == (4, "OMP_NUM_THREADS")
    assert thread_env(budget, env) == {"MKL_NUM_THREADS": "4"}


@pytest.mark.parametrize("value", ["", "0", "many"])
def test_an_empty_or_invalid_omp_num_threads_counts_as_unset(value: str) -> None:
    env = {"OMP_NUM_THREADS": value}
    budget = plan_threads(api_on_host=True, environ=env, cores=4)
    assert (budget.threads, budget.source) == (3, "auto")
    assert thread_env(budget, env) == {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"}


def test_the_decision_reads_as_one_line() -> None:
    auto = ThreadBudget(1, 2, 1, 1, "auto").describe()
    assert auto == "torch threads: 1 (cores available 2, reserved 1 for the API on this host)"
    assert "shared by 2 workers" in ThreadBudget(3, 8, 1, 2, "auto").describe()
    assert ThreadBudget(3, 2, 0, 1, "LORA_TORCH_THREADS").describe() == (
        "torch threads: 3 (set by LORA_TORCH_THREADS; cores available 2)"
    )


def test_configure_sets_the_variables_from_settings(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This test process's own torch keeps its threads, and no later run in it picks the budget up.
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    monkeypatch.setattr(cpu_budget, "_configured", None)
    env: dict[str, str] = {"OMP_NUM_THREADS": ""}
    settings = Settings(torch_threads=0, api_on_host=True, workers_on_host=1)
    with caplog.at_level("INFO", logger="worker.cpu_budget"):
        budget = cpu_budget.configure(settings, env)
    cores = available_cores()
    assert budget.threads == max(1, cores - cpu_budget.reserved_cores(cores, True))
    assert env == {"OMP_NUM_THREADS": str(budget.threads), "MKL_NUM_THREADS": str(budget.threads)}
    assert caplog.messages == [budget.describe()]


def test_settings_read_the_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORA_TORCH_THREADS", "5")
    monkeypatch.setenv("LORA_API_ON_HOST", "true")
    monkeypatch.setenv("LORA_WORKERS_ON_HOST", "2")
    s = Settings()
    assert (s.torch_threads, s.api_on_host, s.workers_on_host) == (5, True, 2)
