"""`lora-server serve` says where things are once they are up; the README's quick start runs as written."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from launcher.embedded_redis import free_port
from tests.integration.process_tree import alive
from tests.integration.test_runner import _descendants
from tests.service import ROOT, wait_until

BANNER_END = "-" * 78


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LORA_REDIS_URL", "LORA_API_KEY", "LORA_MODELS_DIR")}
    env.update({"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "LORA_MIN_FREE_DISK_MB": "1"})
    return env


def _banner(log: Path, proc: subprocess.Popen[bytes], timeout: float = 120) -> str:
    def found() -> str | None:
        text = log.read_text(errors="replace")
        start = text.find("lora-server is ready")
        end = text.find(BANNER_END, start)
        return text[start:end] if start >= 0 and end >= 0 else None

    return str(wait_until(found, timeout=timeout, every=0.3, gives_up=lambda: proc.poll() is not None,
                          what=lambda: "the ready banner; log:\n" + log.read_text(errors="replace")[-3000:]))  # fmt: skip


def _readme_first_job() -> str:
    text = (ROOT / "README.md").read_text()
    quick = text[text.index("## Quick start") :]
    block = re.search(r"```bash\n(make tiny-model.*?)```", quick, re.DOTALL)
    assert block, "the README's quick start has no block starting with `make tiny-model`"
    return block.group(1)


def test_the_banner_comes_once_everything_is_up_and_its_urls_answer(tmp_path: Path, tiny_model_dir: Path) -> None:
    port = free_port()
    base = tmp_path / "models"
    cmd = [sys.executable, "-m", "cli", "serve", "--base_path", str(base), "--port", str(port)]
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        banner = _banner(log, proc)
        api = f"http://127.0.0.1:{port}"
        # Printed only once the API answered and the worker had reported in: both hold now.
        ready = httpx.get(api + "/readyz", timeout=5)
        assert ready.status_code == 200 and ready.json()["workers"], ready.text
        text = log.read_text(errors="replace")
        assert text.index("Uvicorn running on") < text.index("lora-server is ready")

        assert f"API:        {api}\n" in banner
        urls = dict(re.findall(r"^  (Dashboard|OpenAI API):\s+(\S+)", banner, re.MULTILINE))
        assert urls == {"Dashboard": f"{api}/dashboard", "OpenAI API": f"{api}/v1"}
        page = httpx.get(urls["Dashboard"], timeout=10)
        assert page.status_code == 200 and "<html" in page.text.lower()
        models = httpx.get(urls["OpenAI API"] + "/models", timeout=10)
        assert models.status_code == 200 and models.json()["object"] == "list"
        assert f"Base path:  {base.resolve()}" in banner
        assert re.search(r"Workers:    gpu0@\S+ \((CPU|GPU [^)]*)\)", banner), banner
        assert re.search(r"Redis:      redis://127\.0\.0\.1:\d+/0   \(embedded", banner), banner
        exported = re.search(r"export LORA_URL=(\S+)", banner)
        assert exported and exported.group(1) == api
        assert "WARNING" not in banner  # loopback
        assert "Not yet up" not in banner  # the generation worker (chat completions) had reported in too

        # The README's first job, as written (its port changed to this service's; the model that `make tiny-model`
        # writes put in place as that target does, which tests/test_makefile.py checks).
        shutil.copytree(tiny_model_dir, base / "tiny")
        script = _readme_first_job().replace("localhost:8000", f"localhost:{port}")
        script = script.replace(".venv/bin/lora-server", f"{sys.executable} -m cli")
        script = "\n".join(line for line in script.splitlines() if not line.startswith("make tiny-model"))
        env = {**_env(), "LORA_URL": exported.group(1)}
        ran = subprocess.run(["bash", "-ec", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert ran.returncode == 0, ran.stdout + ran.stderr
        assert '"job_id"' in ran.stdout, ran.stdout
        status = wait_until(
            lambda: (
                (body := httpx.get(api + "/status", timeout=5).json())["status"] not in ("training", "idle") and body
            ),
            timeout=120,
            every=0.5,
            what="the README's job to end",
        )
        assert status["status"] == "completed", status
        assert Path(status["model_path"], "adapter_config.json").is_file()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=150)


def test_ctrl_c_while_starting_stops_everything_and_prints_no_banner(tmp_path: Path) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "cli", "serve", "--base_path", str(tmp_path / "models"), "--port", str(port)]
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "starting lora-server on" in log.read_text(errors="replace"), timeout=60, every=0.1,
                   gives_up=lambda: proc.poll() is not None, what="the launcher to start its children")  # fmt: skip
        time.sleep(0.5)  # the children are starting: none is ready yet
        family = _descendants(proc.pid)
        assert family
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0
        wait_until(lambda: not {p for p in family if alive(p)}, timeout=10, what="no process left")
        assert "lora-server is ready" not in log.read_text(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
