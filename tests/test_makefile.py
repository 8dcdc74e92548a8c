"""The two commands: `make run` installs only what the service needs and never needs root."""

from __future__ import annotations

import subprocess
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
