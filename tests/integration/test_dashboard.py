"""The dashboard in a real headless Chromium, driven over the DevTools protocol, against the real service.

Needs Debian's `chromium` (offline: nothing is downloaded); `websockets` comes with uvicorn[standard].
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import ClientConnection, connect

from tests.data import easy_records, jsonl, write_jsonl
from tests.service import Service, assert_chat_served, flush, wait_running, wait_until

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

    def type(self, element_id: str, value: str) -> None:
        self.eval(f"document.getElementById({element_id!r}).value = {value!r}")

    def choose_file(self, element_id: str, path: Path | None) -> None:
        """Put a file into an <input type=file>, as a person picking it would (none: clear it)."""
        if path is None:
            self.eval(f"document.getElementById({element_id!r}).value = ''")
            return
        root = self.call("DOM.getDocument", depth=0)["root"]["nodeId"]
        node = self.call("DOM.querySelector", nodeId=root, selector=f"#{element_id}")["nodeId"]
        self.call("DOM.setFileInputFiles", nodeId=node, files=[str(path)])

    def click(self, element_id: str) -> None:
        self.eval(f"document.getElementById({element_id!r}).click()")


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

    # The workers panel: the service's worker, on this host, on the CPU, training this job.
    (worker,) = service.health()["workers"]
    row = f'#workers tr[data-name="{worker["name"]}"]'
    browser.wait_for(f"(document.querySelector('{row} td.job') || {{}}).textContent === 'busy: {job_id}'", timeout=20)
    cells = browser.eval(f"[...document.querySelectorAll('{row} td')].map(td => td.textContent)")
    assert cells == [worker["name"], socket.gethostname(), "CPU", "1", f"busy: {job_id}"], cells
    assert browser.text("slots-summary") == "1 of 1 slots busy"

    # Pause from the page: the job saves its state and stops; Resume continues it from there.
    assert browser.text("pause") == "Pause"
    browser.eval("document.getElementById('pause').click()")
    paused = service.wait_for(job_id, {"paused"}, timeout=60)
    browser.wait_for("document.getElementById('job-status').textContent === 'paused'", timeout=20)
    browser.wait_for("document.getElementById('pause').textContent === 'Resume'", timeout=20)
    browser.eval("document.getElementById('pause').click()")
    resumed = wait_running(service, job_id, min_step=paused["progress"]["current_step"] + 1, timeout=60)
    assert resumed["attempts"] == 1  # a fresh run of the resumed job, continuing from its saved step
    browser.wait_for("document.getElementById('pause').textContent === 'Pause'", timeout=20)

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
        # The chart fills from the job's event stream, read after its record: it may follow the status.
        browser.wait_for("Number(document.getElementById('loss-chart').dataset.points) >= 1", timeout=30)
        # The page's own calls carry the key too: the adapter download, a form's upload.
        browser.wait_for("!document.getElementById('download').disabled")
        browser.click("download")
        browser.wait_for("document.getElementById('action-message').textContent.startsWith('Saved ')")
        browser.choose_file("f-file", write_jsonl(tmp_path / "train.jsonl", easy_records(2)))
        browser.type("f-model_name", str(tiny_model_dir))
        browser.type("f-epochs", "1")
        browser.eval("document.getElementById('train-form').requestSubmit()")
        browser.wait_for("/^job-/.test(document.getElementById('train-message').textContent)")
        assert not browser.eval("document.getElementById('key-dialog').classList.contains('open')")
        assert not browser.errors, browser.errors
    finally:
        svc.stop()


def _field_error(browser: Page, field: str) -> str:
    return browser.text(f"err-{field}")


def test_dashboard_form_shows_each_error_by_its_field_then_starts_a_job_that_trains(
    service: Service, tiny_model_dir: Path, browser: Page, tmp_path: Path
) -> None:
    good = write_jsonl(tmp_path / "train.jsonl", easy_records(8))
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(jsonl(easy_records(1)) + b'{"messages": [{"role": "assistant", "content": "hi"}]}\n')
    browser.goto(service.url + "/dashboard")
    # Placeholders come from the server's own schema: the TrainConfig defaults.
    browser.wait_for("document.getElementById('f-epochs').placeholder === '3'")
    assert browser.eval("document.getElementById('f-learning_rate').placeholder") == "0.0003"

    # No file chosen: said under the dataset field, nothing sent.
    browser.eval("document.getElementById('train-form').requestSubmit()")
    browser.wait_for("document.getElementById('err-file').textContent.includes('choose a dataset')")

    # A bad config: each field's own message under it; only what was filled in is sent.
    browser.choose_file("f-file", good)
    browser.type("f-model_name", str(tiny_model_dir))
    browser.type("f-epochs", "0")
    browser.type("f-learning_rate", "fast")
    assert json.loads(browser.eval("JSON.stringify(formConfig())")) == {
        "model_name": str(tiny_model_dir), "epochs": 0, "learning_rate": "fast"
    }  # fmt: skip
    browser.eval("document.getElementById('train-form').requestSubmit()")
    browser.wait_for("document.getElementById('err-epochs').textContent !== ''")
    assert "greater than or equal to 1" in _field_error(browser, "epochs")
    assert "valid number" in _field_error(browser, "learning_rate")
    assert _field_error(browser, "batch_size") == "" and _field_error(browser, "file") == ""
    assert browser.eval("document.getElementById('f-epochs').getAttribute('aria-invalid')") == "true"

    # A bad dataset: the line and the reason under the file field; the config's errors are gone.
    browser.type("f-epochs", "2")
    browser.type("f-learning_rate", "")
    browser.choose_file("f-file", bad)
    browser.eval("document.getElementById('train-form').requestSubmit()")
    browser.wait_for("document.getElementById('err-file').textContent.includes('line 2')")
    assert "line 2: " in _field_error(browser, "file") and "user" in _field_error(browser, "file")
    assert _field_error(browser, "epochs") == ""
    assert service.get("/jobs").json()["data"] == []  # nothing was started

    # Every slot taken: a 409 that says so and points at the queue; then "wait in line" queues the job.
    busy = _submit(service, tiny_model_dir, epochs=400, batch_size=2)
    browser.choose_file("f-file", good)
    browser.choose_file("f-validation_file", good)
    browser.eval("document.getElementById('train-form').requestSubmit()")
    browser.wait_for("document.getElementById('train-message').textContent.includes('Wait in line')")
    assert busy in browser.text("train-message")
    browser.click("f-queue")
    browser.eval("document.getElementById('train-form').requestSubmit()")
    browser.wait_for("/^job-/.test(document.getElementById('train-message').textContent)")
    assert "position 1" in browser.text("train-message")
    job_id = browser.text("train-message").split(":")[0]
    browser.wait_for(f"document.getElementById('job-id').textContent === {job_id!r}")
    browser.wait_for(f"!!document.querySelector('#jobs tr[data-id=\"{job_id}\"]')")
    job = service.job(job_id)
    assert job["status"] == "queued" and job["config"]["epochs"] == 2
    assert job["config"]["model_name"] == str(tiny_model_dir)
    assert job["config"]["learning_rate"] == 3e-4  # left empty: the default

    assert service.post(f"/jobs/{busy}/cancel").status_code == 202
    service.wait_for(job_id, {"succeeded", "failed"}, timeout=120)
    assert service.job(job_id)["status"] == "succeeded", service.job(job_id)
    browser.wait_for("document.getElementById('job-status').textContent === 'succeeded'", timeout=30)
    browser.wait_for("Number(document.getElementById('loss-chart').dataset.evalPoints) >= 1")  # the validation file
    # The base model it used is suggested next time.
    options = browser.eval("Array.from(document.getElementById('model-suggestions').options, (o) => o.value)")
    assert str(tiny_model_dir) in options
    assert not browser.errors, browser.errors


def test_dashboard_downloads_the_adapter_and_merges_it(
    service: Service, tiny_model_dir: Path, browser: Page, tmp_path: Path
) -> None:
    job_id = _submit(service, tiny_model_dir, epochs=1)
    service.wait_for(job_id, {"succeeded", "failed"}, timeout=120)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser.call("Page.setDownloadBehavior", behavior="allow", downloadPath=str(downloads))
    browser.goto(f"{service.url}/dashboard#{job_id}")
    browser.wait_for("document.getElementById('job-status').textContent === 'succeeded'")
    browser.wait_for("!document.getElementById('download').disabled")

    browser.click("download")
    browser.wait_for("document.getElementById('action-message').textContent.startsWith('Saved ')")
    archive = wait_until(lambda: [p for p in downloads.glob("*.tar.gz")], timeout=30, what="the downloaded archive")
    with tarfile.open(archive[0]) as tar:
        names = tar.getnames()
    adapter = Path(service.job(job_id)["model_path"])
    assert sorted(names) == sorted(p.relative_to(adapter).as_posix() for p in adapter.rglob("*") if p.is_file())
    assert "adapter_config.json" in names
    assert int(browser.eval("Number(document.getElementById('download').dataset.bytes)")) == archive[0].stat().st_size

    # Merge: the merge job is shown, and followed to its end.
    browser.click("merge")
    browser.wait_for(f"document.getElementById('job-id').textContent !== {job_id!r}")
    merge_id = browser.text("job-id")
    # The id is shown as soon as the merge job is chosen; its kind once its record is read (a moment later).
    browser.wait_for("document.getElementById('job-kind').textContent !== ''")
    assert browser.text("job-kind") == f"merge of {job_id}"
    assert f"as {merge_id}" in browser.text("action-message")
    merged = service.wait_for(merge_id, {"succeeded", "failed"}, timeout=180)
    assert merged["status"] == "succeeded" and merged["kind"] == "merge", merged
    browser.wait_for("document.getElementById('job-status').textContent === 'succeeded'", timeout=30)
    assert browser.eval("document.getElementById('merge').hidden") is True  # a merged model is not merged again
    assert browser.eval("document.getElementById('chat').hidden") is True
    assert not browser.errors, browser.errors


def test_dashboard_chat_box_streams_an_answer_from_the_fine_tuned_model(
    service: Service, tiny_model_dir: Path, browser: Page
) -> None:
    """Needs the chat surface (`POST /v1/chat/completions` and a generation worker, branch `chat`)."""
    assert_chat_served(service)
    job_id = _submit(service, tiny_model_dir, epochs=1)
    service.wait_for(job_id, {"succeeded", "failed"}, timeout=120)

    browser.goto(f"{service.url}/dashboard#{job_id}")
    browser.wait_for("!document.getElementById('chat').hidden")
    # Count the newest answer's updates as they land: a streamed answer grows in pieces.
    browser.eval("""window.__lengths = [];
      new MutationObserver(() => {
        const answers = document.querySelectorAll('#chat-log .assistant');
        const a = answers[answers.length - 1];
        if (a && a.textContent) window.__lengths.push(a.textContent.length);
      }).observe(document.getElementById('chat-log'), {subtree: true, childList: true, characterData: true});""")
    browser.type("chat-max-tokens", "12")
    # The tiny random model may end an answer after its first token, which no stream can show in pieces:
    # ask again (the conversation goes on) until an answer of several pieces came, at most four times.
    for turn in range(1, 5):
        browser.eval("window.__lengths = []")
        browser.type("chat-input", "What color is the sky?")
        browser.eval("document.getElementById('chat-form').requestSubmit()")
        done = f"document.querySelectorAll('#chat-log .assistant[data-done=\"1\"]').length === {turn}"
        browser.wait_for(done, timeout=120)
        assert browser.text("chat-error") == ""
        questions = browser.eval("[...document.querySelectorAll('#chat-log .user')].map(e => e.textContent)")
        assert questions == ["What color is the sky?"] * turn
        answer = browser.eval("[...document.querySelectorAll('#chat-log .assistant')].pop().textContent")
        assert answer, "an empty answer"
        lengths = browser.eval("window.__lengths")
        assert lengths == sorted(lengths), lengths  # it only ever grows
        if len(set(lengths)) >= 2:  # shown in pieces as they came
            break
    else:
        raise AssertionError(f"four answers, none shown in pieces: {lengths}")
    assert browser.eval("state.chat.length") == 2 * turn  # each question carries the conversation
    assert not browser.errors, browser.errors


def test_dashboard_shows_each_jobs_own_figures_model_and_ft_name_and_a_merge_as_a_merge(
    service: Service, tiny_model_dir: Path, browser: Page
) -> None:
    # Two real short jobs, one after the other (one slot), of different lengths; then a merge of the first.
    first = _submit(service, tiny_model_dir, epochs=1, batch_size=4)  # 2 steps
    assert service.wait_for(first, {"succeeded", "failed"})["status"] == "succeeded"
    second = _submit(service, tiny_model_dir, epochs=3, batch_size=2)  # 12 steps
    assert service.wait_for(second, {"succeeded", "failed"})["status"] == "succeeded"
    r = service.post(f"/jobs/{first}/merge")
    assert r.status_code == 202, r.text
    merge = r.json()["job_id"]
    assert service.wait_for(merge, {"succeeded", "failed"})["status"] == "succeeded"
    jobs = {job_id: service.job(job_id) for job_id in (first, second)}
    model = tiny_model_dir.name  # the base's one name: its folder's name in the models directory

    def losses(job_id: str) -> int:
        events = service.get(f"/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
        return sum(1 for e in events if e["type"] == "metrics" and e["data"].get("loss") is not None)

    def shows(job_id: str) -> None:
        """The panel shows this job's own figures (waiting for them), model and ft: name; no ETA: it ended."""
        p = jobs[job_id]["progress"]
        browser.wait_for(f"document.getElementById('job-id').textContent === {job_id!r}")
        browser.wait_for(f"document.getElementById('step-text').textContent === 'step {p['total_steps']} / "
                         f"{p['total_steps']}'")  # fmt: skip
        browser.wait_for(f"document.getElementById('loss').textContent === Number({p['loss']!r}).toFixed(4)")
        browser.wait_for(f"Number(document.getElementById('loss-chart').dataset.points) === {losses(job_id)}")
        browser.wait_for(f"document.getElementById('job-ft').textContent === {jobs[job_id]['fine_tuned_model']!r}")
        assert jobs[job_id]["fine_tuned_model"] == f"ft:{model}::{job_id}"
        assert browser.text("job-model") == model
        assert browser.eval("document.getElementById('job-ft-row').hidden") is False
        assert browser.text("eta") == "–"
        assert browser.text("epoch") == f"{p['current_epoch']} / {p['total_epochs']}"

    browser.goto(f"{service.url}/dashboard#{first}")
    shows(first)
    assert jobs[first]["progress"]["loss"] != jobs[second]["progress"]["loss"]
    browser.eval(f"document.querySelector('#jobs tr[data-id=\"{second}\"]').click()")  # another job, from the list
    shows(second)
    # The figures are the second job's own: its chart has its own (more) points, not the first's added to them.
    assert losses(second) != losses(first)

    # A merge is shown as a merge (no steps, loss or ETA of its own, and none left over from the job before).
    browser.eval(f"location.hash = {merge!r}")
    browser.wait_for("document.getElementById('step-text').textContent === 'merge: succeeded'")
    for figure in ("loss", "eta", "epoch", "tps"):
        assert browser.text(figure) == "–", figure
    assert browser.eval("Number(document.getElementById('loss-chart').dataset.points)") == 0
    browser.wait_for("document.getElementById('job-kind').textContent !== ''")
    assert browser.text("job-kind") == f"merge of {first}" and browser.text("job-model") == model
    assert browser.eval("document.getElementById('job-ft-row').hidden") is True
    browser.wait_for(f"!!document.querySelector('#jobs tr[data-id=\"{merge}\"]')")
    row = f"document.querySelector('#jobs tr[data-id=\"{merge}\"]')"
    assert browser.eval(f"{row}.children[2].textContent") == "merge"

    # Ids are whole, monospace, and titled with the full id; the panel's can be copied.
    for job_id in (first, second, merge):
        cell = f"document.querySelector('#jobs tr[data-id=\"{job_id}\"] td.id')"
        assert browser.eval(f"{cell}.textContent") == browser.eval(f"{cell}.title") == job_id
        assert browser.eval(f"{cell}.scrollWidth <= {cell}.clientWidth"), job_id  # not cut short
        assert "monospace" in browser.eval(f"getComputedStyle({cell}).fontFamily")
    assert browser.eval("document.getElementById('job-id').title") == merge
    browser.click("copy-id")
    assert not browser.errors, browser.errors
