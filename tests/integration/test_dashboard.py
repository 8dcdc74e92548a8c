"""The dashboard in a real headless Chromium, driven over the DevTools protocol, against the real service.

Needs Debian's `chromium` (offline: nothing is downloaded); `websockets` comes with uvicorn[standard].
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import ClientConnection, connect

from tests.data import easy_records, jsonl
from tests.service import Service, flush, wait_running, wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Page:
    """One browser tab over CDP: evaluate JavaScript, wait for conditions, collect page errors."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.errors: list[str] = []
        self.call("Runtime.enable")
        self.call("Page.enable")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self.ids)
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == call_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})  # type: ignore[no-any-return]
            self._note(msg)

    def _note(self, msg: dict[str, Any]) -> None:
        if msg.get("method") == "Runtime.exceptionThrown":
            details = msg["params"]["exceptionDetails"]
            self.errors.append(str(details.get("exception", {}).get("description") or details.get("text")))
        elif msg.get("method") == "Runtime.consoleAPICalled" and msg["params"]["type"] == "error":
            self.errors.append(" ".join(str(a.get("value", a.get("description"))) for a in msg["params"]["args"]))

    def eval(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0) -> Any:
        return wait_until(
            lambda: self.eval(expression), timeout=timeout, what=lambda: f"{expression}; page errors: {self.errors}"
        )

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete' && !!document.getElementById('jobs')")

    def text(self, element_id: str) -> str:
        return str(self.eval(f"document.getElementById({element_id!r}).textContent"))


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Page]:
    assert CHROMIUM, "chromium is needed for the dashboard test (apt-get install -y chromium)"
    profile = tmp_path / "chromium-profile"
    log = (tmp_path / "chromium.log").open("wb")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
           f"--user-data-dir={profile}", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
           "--window-size=1280,900", "about:blank"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
    try:
        port_file = profile / "DevToolsActivePort"
        wait_until(
            lambda: port_file.exists() and port_file.read_text().strip(),
            timeout=30,
            every=0.1,
            gives_up=lambda: proc.poll() is not None,
            what=lambda: f"chromium's DevTools port: {(tmp_path / 'chromium.log').read_text()[-3000:]}",
        )
        port = int(port_file.read_text().split()[0])
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page_target = next(t for t in targets if t["type"] == "page")
        with connect(page_target["webSocketDebuggerUrl"], max_size=None, open_timeout=10) as ws:
            yield Page(ws)
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()


def _submit(service: Service, model_dir: Path, headers: dict[str, str] | None = None, **config: Any) -> str:
    cfg = {"model_name": str(model_dir), **config}
    files = {"config": (None, json.dumps(cfg)), "file": ("d.jsonl", jsonl(easy_records(8)))}
    r = service.post("/train", files=files, headers=headers or {})
    assert r.status_code == 202, r.text
    return str(r.json()["job_id"])


_CHART_PIXELS = """(() => {
  const c = document.getElementById('loss-chart');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4) if (d[i + 3] > 0 && d[i + 2] > 150 && d[i] < 120) n++;
  return n;
})()"""


def test_dashboard_shows_live_progress_and_loss_and_cancels(
    service: Service, tiny_model_dir: Path, browser: Page
) -> None:
    # 6 training records (2 held out) in batches of 2: 1200 steps, far longer than the test needs.
    job_id = _submit(service, tiny_model_dir, epochs=400, batch_size=2, validation_split=0.25)
    root = httpx.get(service.url + "/", follow_redirects=False, timeout=10)
    assert root.status_code in (302, 307) and root.headers["location"].endswith("/dashboard")
    page = service.get("/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'sha256-" in page.headers["content-security-policy"]

    browser.goto(service.url + "/")
    assert browser.eval("location.pathname") == "/dashboard"
    browser.wait_for(f"!!document.querySelector('#jobs tr[data-id=\"{job_id}\"]')")
    browser.wait_for(f"document.getElementById('job-id').textContent === {job_id!r}")

    # The progress shown moves while the job trains.
    wait_running(service, job_id, min_step=1)
    browser.wait_for("Number(document.getElementById('progress').dataset.step || 0) >= 1", timeout=30)
    browser.wait_for("document.getElementById('step-text').textContent.endsWith('/ 1200')", timeout=10)
    first = browser.text("step-text")
    browser.wait_for(f"document.getElementById('step-text').textContent !== {first!r}", timeout=30)
    second = browser.text("step-text")
    assert first != second and second.startswith("step ") and "/ 1200" in second, (first, second)
    bar = float(browser.eval("document.getElementById('progress').getAttribute('aria-valuenow')"))
    assert 0 < bar < 100

    # The loss curve has points, drawn on the canvas; ETA, tokens/s and epoch are shown.
    points = int(browser.wait_for("Number(document.getElementById('loss-chart').dataset.points) >= 3 && "
                                  "Number(document.getElementById('loss-chart').dataset.points)"))  # fmt: skip
    assert points >= 3
    assert browser.eval(_CHART_PIXELS) > 20
    browser.wait_for("Number(document.getElementById('loss-chart').dataset.evalPoints) >= 1")  # held-out loss
    browser.wait_for("/^\\d+:\\d\\d/.test(document.getElementById('eta').textContent)")
    browser.wait_for("/^\\d+$/.test(document.getElementById('tps').textContent)")
    assert browser.text("epoch").endswith("/ 400")
    assert float(browser.text("loss")) > 0

    # Cancel from the page.
    assert browser.eval("document.getElementById('cancel').disabled") is False
    browser.eval("document.getElementById('cancel').click()")
    job = service.wait_for(job_id, {"cancelled", "succeeded", "failed"}, timeout=60)
    assert job["status"] == "cancelled"
    browser.wait_for("document.getElementById('job-status').textContent === 'cancelled'", timeout=20)
    assert browser.eval("document.getElementById('cancel').disabled") is True
    assert not browser.errors, browser.errors


def test_dashboard_asks_for_the_api_key_once_and_keeps_it(
    tmp_path: Path, redis_url: str, tiny_model_dir: Path, browser: Page
) -> None:
    flush(redis_url)
    svc = Service(base_path=tmp_path / "base", redis_url=redis_url, log_dir=tmp_path / "logs",
                  env_extra={"LORA_API_KEY": "s3cret"})  # fmt: skip
    svc.start()
    try:
        assert svc.get("/dashboard").status_code == 200  # the page itself is open
        assert svc.get("/jobs").status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        job_id = _submit(svc, tiny_model_dir, headers=auth, epochs=1)

        browser.goto(svc.url + "/dashboard")
        browser.wait_for("document.getElementById('key-dialog').classList.contains('open')")
        assert browser.eval("document.querySelectorAll('#jobs tr').length") == 0

        def enter(key: str) -> None:
            browser.eval(f"document.getElementById('key-input').value = {key!r}")
            browser.eval("document.getElementById('key-form').requestSubmit()")

        enter("wrong")
        browser.wait_for("document.getElementById('key-reason').textContent.includes('refused')")
        enter("s3cret")
        browser.wait_for(f"!!document.querySelector('#jobs tr[data-id=\"{job_id}\"]')")
        assert not browser.eval("document.getElementById('key-dialog').classList.contains('open')")
        assert browser.eval("localStorage.getItem('lora-server.apiKey')") == "s3cret"

        # A fresh load uses the stored key without asking again.
        browser.goto(svc.url + "/dashboard")
        browser.wait_for(f"!!document.querySelector('#jobs tr[data-id=\"{job_id}\"]')")
        browser.wait_for(f"document.getElementById('job-id').textContent === {job_id!r}")
        assert not browser.eval("document.getElementById('key-dialog').classList.contains('open')")
        wait_until(
            lambda: svc.get(f"/jobs/{job_id}", headers=auth).json()["status"] in ("succeeded", "failed"),
            timeout=120,
            every=0.3,
            what=lambda: f"job {job_id} to end\n{svc.logs('worker')}",
        )
        browser.wait_for("document.getElementById('job-status').textContent === 'succeeded'", timeout=30)
        assert int(browser.eval("Number(document.getElementById('loss-chart').dataset.points)")) >= 1
        assert not browser.errors, browser.errors
    finally:
        svc.stop()
