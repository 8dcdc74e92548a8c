"""The ready banner's wording (pure), and the watch that decides when to print it, against a real HTTP server."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from launcher.banner import (
    BannerFacts,
    ReadyWatch,
    api_url,
    reachable_host,
    ready_banner,
    without_password,
    worker_devices,
)
from launcher.embedded_redis import free_port


def facts(**changes: object) -> BannerFacts:
    base: dict[str, object] = {
        "host": "127.0.0.1",
        "port": 8000,
        "base_path": Path("/srv/models"),
        "redis_url": "redis://127.0.0.1:6390/0",
        "redis_embedded": True,
        "workers": ["gpu0@box"],
        "devices": {"gpu0": "CPU"},
    }
    return BannerFacts(**{**base, **changes})  # type: ignore[arg-type]


def test_the_banner_says_where_everything_is() -> None:
    text = ready_banner(facts())
    assert "API:        http://127.0.0.1:8000\n" in text
    assert "Dashboard:  http://127.0.0.1:8000/dashboard" in text
    assert "OpenAI API: http://127.0.0.1:8000/v1 " in text and "http://127.0.0.1:8000/v1/models" in text
    assert "Tinker API: http://127.0.0.1:8000   (export TINKER_BASE_URL=http://127.0.0.1:8000 TINKER_API_KEY=tml-" in text
    assert "Base path:  /srv/models" in text
    assert "gpu0@box (CPU)" in text
    assert "Redis:      redis://127.0.0.1:6390/0   (embedded, data in /srv/models/.redis)" in text
    assert "export LORA_URL=http://127.0.0.1:8000" in text
    assert "WARNING" not in text and "LORA_API_KEY" not in text and "Not yet up" not in text
    assert "              .venv/bin/lora-server jobs" in ready_banner(facts(cli=".venv/bin/lora-server"))


def test_all_interfaces_get_a_usable_url_and_an_open_api_is_called_out() -> None:
    text = ready_banner(facts(host="0.0.0.0"))
    assert "API:        http://127.0.0.1:8000   (listening on all interfaces, 0.0.0.0:8000)" in text
    assert "export LORA_URL=http://127.0.0.1:8000" in text
    assert "WARNING:    the API is open to the network on 0.0.0.0:8000 without LORA_API_KEY" in text
    keyed = ready_banner(facts(host="0.0.0.0", api_key_set=True))
    assert "WARNING" not in keyed and "export LORA_API_KEY=..." in keyed
    assert "WARNING" in ready_banner(facts(host="10.1.2.3"))
    assert "http://[::1]:8000/dashboard" in ready_banner(facts(host="::"))


@pytest.mark.parametrize(
    ("host", "reachable"),
    [("0.0.0.0", "127.0.0.1"), ("::", "[::1]"), ("localhost", "localhost"), ("fe80::1", "[fe80::1]"),
     ("10.0.0.5", "10.0.0.5"), ("box.lan", "box.lan")],
)  # fmt: skip
def test_reachable_host(host: str, reachable: str) -> None:
    assert reachable_host(host) == reachable
    assert api_url(host, 9) == f"http://{reachable}:9"


def test_the_redis_password_is_never_printed() -> None:
    assert without_password("redis://:s3cret@redis-host:6379/0") == "redis://:***@redis-host:6379/0"
    assert without_password("rediss://me:s3cret@[::1]:6380/2") == "rediss://me:***@[::1]:6380/2"
    assert without_password("redis://redis-host:6379/0") == "redis://redis-host:6379/0"
    text = ready_banner(facts(redis_url="redis://:s3cret@redis-host:6379/0", redis_embedded=False))
    assert "s3cret" not in text and "redis://:***@redis-host:6379/0   (external)" in text


def test_workers_their_devices_and_those_missing() -> None:
    text = ready_banner(
        facts(
            workers=["gpu0@box", "gpu1@box", "hostb-gpu0@other"],
            devices={"gpu0": "GPU 0: NVIDIA H200", "gpu1": "GPU 1: NVIDIA H200"},
            expected_workers=3,
        )
    )
    assert "Workers:    gpu0@box (GPU 0: NVIDIA H200)\n              gpu1@box (GPU 1: NVIDIA H200)" in text
    assert "hostb-gpu0@other (started elsewhere)" in text and "only" not in text
    assert "only 1 of the 2 workers started here reported in" in ready_banner(facts(expected_workers=2))
    assert "their names are shown to a caller with LORA_API_KEY" in ready_banner(facts(workers=None))


def test_worker_devices() -> None:
    gpus = {"0": "NVIDIA H200", "1": "NVIDIA H200"}
    assert worker_devices([("gpu1", "1")], gpus, None) == {"gpu1": "GPU 1: NVIDIA H200"}
    assert worker_devices([("gpu0", None)], gpus, None) == {"gpu0": "GPU 0: NVIDIA H200"}
    assert worker_devices([("gpu0", None)], gpus, "1") == {"gpu0": "GPU 1: NVIDIA H200"}
    assert worker_devices([("gpu0", None)], gpus, "") == {"gpu0": "CPU"}
    assert worker_devices([("gpu0", None), ("gpu1", None)], {}, None) == {"gpu0": "CPU", "gpu1": "CPU"}


class _Readyz:
    """A real HTTP server standing in for the API's /readyz, whose answer the test sets."""

    def __init__(self) -> None:
        self.status = 503
        self.body: dict[str, object] = {"status": "unavailable", "reason": "no worker has reported in the last 10 s"}
        self.auth: list[str | None] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.auth.append(self.headers.get("Authorization"))
                data = json.dumps(owner.body).encode()
                self.send_response(owner.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def readyz() -> Iterator[_Readyz]:
    server = _Readyz()
    yield server
    server.server.shutdown()
    server.server.server_close()


Ready = list[tuple[list[str] | None, list[str]]]


def _watch(
    url: str, expected: int = 1, key: str | None = None, pending: list[str] | None = None
) -> tuple[ReadyWatch, Ready, list[str]]:
    ready: Ready = []
    late: list[str] = []
    watch = ReadyWatch(
        url,
        key,
        expected,
        timeout_s=10,
        on_ready=lambda workers, waiting: ready.append((workers, waiting)),
        on_late=late.append,
        pending=lambda: list(pending or []),
        every_s=0,
    )
    return watch, ready, late


def test_the_banner_waits_for_the_api_and_then_for_every_worker(readyz: _Readyz) -> None:
    watch, ready, late = _watch(readyz.url, expected=2, key="k")
    watch.poll(1.0)
    assert ready == [] and late == []
    readyz.status, readyz.body = 200, {"status": "ready", "workers": ["gpu0@box"]}
    watch.poll(2.0)
    assert ready == []  # one of two: not yet
    readyz.body = {"status": "ready", "workers": ["gpu0@box", "gpu1@box"]}
    watch.poll(3.0)
    watch.poll(4.0)
    assert ready == [(["gpu0@box", "gpu1@box"], [])] and late == []  # once
    assert set(readyz.auth) == {"Bearer k"}


def test_past_the_timeout_a_partial_start_still_gets_its_banner(readyz: _Readyz) -> None:
    watch, ready, late = _watch(readyz.url, expected=2)
    readyz.status, readyz.body = 200, {"status": "ready", "workers": ["gpu0@box"]}
    watch.poll(1.0)
    assert ready == []
    watch.poll(11.0)
    assert ready == [(["gpu0@box"], [])] and late == []


def test_a_late_start_says_which_part_is_missing(readyz: _Readyz) -> None:
    down, ready, late = _watch(f"http://127.0.0.1:{free_port()}")
    down.poll(11.0)
    down.poll(12.0)
    assert ready == [] and len(late) == 1 and "the API did not answer at http://127.0.0.1:" in late[0]

    watch, ready, late = _watch(readyz.url)
    watch.poll(11.0)
    assert ready == [] and len(late) == 1
    assert "the API is up" in late[0] and "no worker reported in" in late[0] and "last 10 s" in late[0]
    readyz.status, readyz.body = 200, {"status": "ready", "workers": ["gpu0@box"]}
    watch.poll(30.0)
    assert ready == [(["gpu0@box"], [])]  # the banner still comes once it is ready


def test_without_the_key_readiness_is_enough(readyz: _Readyz) -> None:
    watch, ready, _ = _watch(readyz.url, expected=2)
    readyz.status, readyz.body = 200, {"status": "ready"}
    watch.poll(1.0)
    assert ready == [(None, [])]


def test_the_banner_waits_for_the_generation_workers_too(readyz: _Readyz) -> None:
    waiting = ["generate0 (chat completions)"]
    watch, ready, late = _watch(readyz.url, pending=waiting)
    readyz.status, readyz.body = 200, {"status": "ready", "workers": ["gpu0@box"]}
    watch.poll(1.0)
    assert ready == []
    watch.poll(11.0)  # past the timeout: the banner, naming what is not up
    assert ready == [(["gpu0@box"], waiting)] and late == []
    assert "Not yet up: generate0 (chat completions)" in ready_banner(facts(pending=waiting))
