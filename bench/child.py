"""One benchmark row in its own process: clean peak memory, a cold start when one is wanted, and a timeout
that ends the row's own children (compile workers) too."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]  # the children import bench, tests and worker from here


def run_child(command: Callable[[Path], Sequence[str]], label: str, timeout: float | None) -> dict[str, Any]:
    """Run ``command(out)``, which writes its result as JSON to `out`; the result, or ``{"engine": label,
    "error": ...}`` when it failed, timed out or wrote nothing."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        log = Path(tmp) / "log.txt"
        with log.open("wb") as sink:
            # Its own session, so a timeout ends the child's own children too.
            proc = subprocess.Popen(
                list(command(out)), cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                code = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                return {"engine": label, "error": _failure(f"timed out after {timeout:.0f} s", log)}
            except BaseException:  # Ctrl+C, or SIGTERM (see `terminated`): the child's session would outlive us
                _kill_group(proc)
                raise
        if code != 0 or not out.exists():
            return {"engine": label, "error": _failure(f"exit {code}", log)}
        result: dict[str, Any] = json.loads(out.read_text())
        return result


def terminated(signum: int, frame: object) -> None:
    """A SIGTERM handler for the parent: unwinds through `run_child`, which stops the running row."""
    raise SystemExit(128 + signum)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _failure(what: str, log: Path) -> str:
    """`what`, the output's last line (usually the exception) on the first line, then the output's end."""
    text = log.read_text(errors="replace")
    last = next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "no output")
    return f"{what}: {last[:300]}\n{text[-3000:]}"
