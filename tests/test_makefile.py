"""The two commands: `make run` installs only what the service needs and never needs root."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def dry_run(target: str) -> str:
    # -B: as on a fresh clone (every install step would run); -n: print, run nothing.
    out = subprocess.run(["make", "-Bn", target], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout


def test_make_run_installs_no_browser_and_needs_no_root() -> None:
    steps = dry_run("run")
    assert "pip install" in steps and "lora-server" in steps
    assert "apt-get" not in steps and "chromium" not in steps and "sudo" not in steps


def test_make_test_sets_up_the_browser_for_the_dashboard_tests() -> None:
    steps = dry_run("test")
    assert "chromium" in steps and "pytest" in steps


def _venv(tmp_path: Path, *stamps: str) -> Path:
    """A stand-in for an installed .venv: its python is this one, and `stamps` say what was installed."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    # A wrapper, not a symlink: a linked python outside its venv would not find the venv's packages.
    (venv / "bin" / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (venv / "bin" / "python").chmod(0o755)
    for stamp in stamps:
        (venv / stamp).touch()  # newer than pyproject.toml
    return venv


def planned(target: str, venv: Path, *extra: str) -> str:
    # -n without -B: what make would run given the stamps already there.
    cmd = ["make", "-n", target, f"VENV={venv}", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout


def test_make_run_installs_the_runtime_only() -> None:
    installs = [line for line in dry_run("run").splitlines() if "pip install" in line and "-e" in line]
    assert installs == ['.venv/bin/python -m pip install -q -e ".[worker]"'], installs


def test_make_test_installs_the_extras_the_tests_import() -> None:
    installs = [line for line in dry_run("test").splitlines() if "pip install" in line and "-e" in line]
    extras = set(installs[-1].split("[", 1)[1].split("]", 1)[0].split(","))
    # bench: trl for the baseline's tests; wandb: the W&B logging test; dev: pytest, ruff, mypy, the clients.
    assert extras >= {"worker", "bench", "wandb", "dev"}, installs


def test_make_test_after_make_run_adds_only_the_test_extras(tmp_path: Path) -> None:
    steps = planned("test", _venv(tmp_path, ".installed-run"))
    assert '-e ".[worker]"' not in steps and "dev" in steps and "pytest" in steps
    assert "-m venv" not in steps


def test_make_run_after_make_test_installs_nothing(tmp_path: Path) -> None:
    steps = planned("run", _venv(tmp_path, ".installed-run", ".installed-test"))
    assert "pip" not in steps and "-m venv" not in steps
    assert "lora-server" in steps


def test_make_tiny_model_writes_the_model_with_the_venvs_python_once(tmp_path: Path) -> None:
    venv = _venv(tmp_path, ".installed-run")
    base = tmp_path / "models"
    assert f"{venv}/bin/python -m tests.fixtures.tiny_model" in planned("tiny-model", venv, f"BASE_PATH={base}")
    cmd = ["make", "-s", "tiny-model", f"VENV={venv}", f"BASE_PATH={base}"]
    subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    assert (base / "tiny" / "config.json").is_file() and (base / "tiny" / "tokenizer_config.json").is_file()
    written = (base / "tiny" / "model.safetensors").stat().st_mtime_ns
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    assert "already there" in again.stdout
    assert (base / "tiny" / "model.safetensors").stat().st_mtime_ns == written


def _readme_quick_start() -> str:
    text = (ROOT / "README.md").read_text()
    return text[text.index("## Quick start") : text.index("\n## ", text.index("## Quick start") + 1)]


def test_the_readme_quick_start_names_only_targets_that_exist_and_trains_the_tiny_model() -> None:
    quick = _readme_quick_start()
    targets = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.MULTILINE))
    named = set(re.findall(r"\bmake ([a-z][a-z-]*)", quick))
    assert {"run", "test", "tiny-model"} <= named <= targets, named - targets
    # The two-command quick start stays at the top.
    first_block = quick[quick.index("```bash") : quick.index("```", quick.index("```bash") + 3)]
    assert "make run" in first_block and "make test" in first_block
    assert '\\"model_name\\": \\"tiny\\"' in quick and "/status" in quick
    assert ".venv/bin/lora-server" in quick or "source .venv/bin/activate" in quick
    # The dataset the curl uploads is one the README writes (or one in the repository).
    uploaded = re.findall(r"file=@([^;\"]+)", quick)
    assert uploaded
    for name in uploaded:
        assert f"> {name}" in quick or (ROOT / name).is_file(), name
