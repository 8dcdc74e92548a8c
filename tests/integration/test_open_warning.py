"""An API reachable from the network without a key says so at start; on loopback it stays quiet."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.embedded_redis import free_port
from tests.service import ROOT, wait_until_up


@pytest.mark.parametrize(
    ("host", "key", "warns"), [("0.0.0.0", "", True), ("0.0.0.0", "k", False), ("127.0.0.1", "", False)]
)
def test_open_api_on_the_network_is_warned_about(
    tmp_path: Path, redis_url: str, host: str, key: str, warns: bool
) -> None:
    port = free_port()
    env = {**os.environ, "LORA_REDIS_URL": redis_url, "LORA_BASE_PATH": str(tmp_path), "PYTHONPATH": str(ROOT)}
    env.pop("LORA_API_KEY", None)
    if key:
        env["LORA_API_KEY"] = key
    cmd = [sys.executable, "-m", "uvicorn", "api.main:create_app", "--factory", "--host", host, "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_until_up(f"http://127.0.0.1:{port}/healthz", proc, timeout=30), "API did not start"
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert ("without LORA_API_KEY" in out) is warns, out
