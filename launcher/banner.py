"""The one-machine mode's ready banner: once the API answers and the workers have reported in, where everything is.

`ready_banner` is pure (what it prints follows from its arguments alone); `ReadyWatch` polls the API's
`/readyz` from the launcher's supervision loop, a short request at a time, so Ctrl+C during start-up still
stops everything at once; `gpu_names` asks `nvidia-smi` (no torch in the launcher) what the workers will see.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from shared.addresses import is_loopback

# The environment variable the CLI reads for the server's address (cli/main.py: `--url`, default LORA_URL).
CLI_URL_VAR = "LORA_URL"
DASHBOARD_PATH = "/dashboard"  # api/routes/dashboard.py
OPENAI_PATH = "/v1"
ALL_INTERFACES = frozenset({"0.0.0.0", "::", ""})


def reachable_host(host: str) -> str:
    """A host for URLs to a server bound to `host`: the wildcard addresses are not addresses to connect to."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]"
    except ValueError:
        pass
    return host


def api_url(host: str, port: int) -> str:
    return f"http://{reachable_host(host)}:{port}"


def without_password(url: str) -> str:
    """A Redis URL fit to print: any password becomes `***` (the user name, host, port and database stay)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port is not None else "")
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass(frozen=True)
class BannerFacts:
    """What the banner states; the launcher gathers it, the banner only words it."""

    host: str
    port: int
    base_path: Path
    redis_url: str
    redis_embedded: bool
    # Workers that reported in (their Celery node names), or None when /readyz would not name them (a key the
    # launcher does not hold).
    workers: Sequence[str] | None
    # Node-name prefix ("gpu0") -> what the worker trains on ("GPU 0: NVIDIA H200", "CPU"): the workers started here.
    devices: dict[str, str] = field(default_factory=dict)
    api_key_set: bool = False
    expected_workers: int = 1
    # Parts started here that had not reported in when the banner was printed (a generation worker, say).
    pending: Sequence[str] = ()
    # How to run the CLI from here ("lora-server" when it is on PATH, else its path).
    cli: str = "lora-server"


def ready_banner(facts: BannerFacts) -> str:
    url = api_url(facts.host, facts.port)
    rule = "-" * 78
    listen = ""
    if facts.host in ALL_INTERFACES:  # the URL names this machine; others reach it by its network address
        listen = f"   (listening on all interfaces, {facts.host or '0.0.0.0'}:{facts.port})"
    lines = [
        rule,
        "lora-server is ready",
        f"  API:        {url}{listen}",
        f"  Dashboard:  {url}{DASHBOARD_PATH}",
        f"  OpenAI API: {url}{OPENAI_PATH}   (base_url for OpenAI clients; models at {url}{OPENAI_PATH}/models)",
        f"  Tinker API: {url}   (export TINKER_BASE_URL={url} TINKER_API_KEY=tml-"
        + ("<LORA_API_KEY>" if facts.api_key_set else "local")
        + " for the tinker SDK)",
        f'  Base path:  {facts.base_path}   ("model_name": "<folder>" trains the model in <base path>/<folder>)',
    ]
    if facts.workers is None:
        lines.append("  Workers:    ready (their names are shown to a caller with LORA_API_KEY)")
    else:
        described = [f"{name} ({_device(name, facts.devices)})" for name in facts.workers]
        lines.append(f"  Workers:    {described[0] if described else 'none'}")
        lines.extend(f"              {item}" for item in described[1:])
        if len(facts.workers) < facts.expected_workers:
            lines.append(
                f"              only {len(facts.workers)} of the {facts.expected_workers} workers started here "
                "reported in so far"
            )
    if facts.pending:
        lines.append(f"  Not yet up: {', '.join(facts.pending)}")
    where = "embedded, data in " + str(facts.base_path / ".redis") if facts.redis_embedded else "external"
    lines.append(f"  Redis:      {without_password(facts.redis_url)}   ({where})")
    lines.append(f"  CLI:        export {CLI_URL_VAR}={url}")
    if facts.api_key_set:
        lines.append("              export LORA_API_KEY=...   (the API asks every request but the probes for it)")
    lines.append(f"              {facts.cli} jobs")
    if not facts.api_key_set and not is_loopback(facts.host):
        lines.append(
            f"  WARNING:    the API is open to the network on {facts.host or '0.0.0.0'}:{facts.port} without "
            "LORA_API_KEY: anyone who can reach it can train and cancel jobs. Set LORA_API_KEY, or listen on "
            "127.0.0.1."
        )
    lines.append(rule)
    return "\n".join(lines)


def _device(name: str, devices: dict[str, str]) -> str:
    return devices.get(name.split("@", 1)[0], "started elsewhere")


def gpu_names(timeout_s: float = 5.0) -> dict[str, str]:
    """GPU index -> name, as `nvidia-smi` lists them; empty without one (a CPU-only machine) or if it fails."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return {}
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index,name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    found: dict[str, str] = {}
    for line in out.splitlines():
        index, _, name = line.partition(",")
        if index.strip() and name.strip():
            found[index.strip()] = name.strip()
    return found


def worker_devices(
    prefixes: Sequence[tuple[str, str | None]], gpus: dict[str, str], visible: str | None
) -> dict[str, str]:
    """Node-name prefix -> what the worker started with it trains on.

    `prefixes`: (prefix, the GPU it is pinned to or None); `gpus`: index -> name on this machine; `visible`:
    the launcher's CUDA_VISIBLE_DEVICES, which an unpinned worker inherits."""
    described: dict[str, str] = {}
    for prefix, pinned in prefixes:
        if pinned is not None:
            described[prefix] = f"GPU {pinned}: {gpus[pinned]}" if pinned in gpus else f"GPU {pinned}"
            continue
        if visible is not None:
            shown = [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
            candidates = [f"GPU {g}: {gpus[g]}" if g in gpus else f"GPU {g}" for g in shown] if gpus else []
        else:
            candidates = [f"GPU {i}: {n}" for i, n in gpus.items()]
        # Torch trains on the first visible GPU; none visible means the CPU.
        described[prefix] = candidates[0] if candidates else "CPU"
    return described


# The launcher asks its own API: never through an HTTP proxy the environment names.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class ReadyWatch:
    """Polls `/readyz` until the API answers and the workers have reported in, then calls `on_ready` once.

    Each poll is one short request, made from the supervision loop (`poll`), so that loop still notices a
    signal or a dead child between polls. Past `timeout_s` without readiness it says once which part is
    missing (`on_late`) and keeps watching: a slow first start still gets its banner."""

    url: str
    api_key: str | None
    expected_workers: int
    timeout_s: float
    on_ready: Callable[[list[str] | None, list[str]], None]
    on_late: Callable[[str], None]
    # What else started here has not reported in yet (descriptions; empty once all have): asked after /readyz.
    pending: Callable[[], list[str]] = list
    every_s: float = 0.5
    started_at: float = 0.0
    done: bool = False
    _next_at: float = 0.0
    _warned: bool = False
    _api_up: bool = False
    _last: str = "no answer yet"
    _workers: list[str] | None = field(default_factory=list)

    def poll(self, now: float) -> None:
        if self.done or now < self._next_at:
            return
        self._next_at = now + self.every_s
        self._ask()
        late = now - self.started_at >= self.timeout_s
        enough = self._workers is None or len(self._workers) >= self.expected_workers
        if self._api_up and self._workers != []:
            waiting = self.pending()
            if (enough and not waiting) or late:
                self.done = True
                self.on_ready(self._workers, waiting)
                return
            if not waiting:
                self._last = f"{len(self._workers or [])} of {self.expected_workers} workers reported in"
            else:
                self._last = "waiting for " + ", ".join(waiting)
        if late and not self._warned:
            self._warned = True
            self.on_late(self._missing())

    def _ask(self) -> None:
        request = urllib.request.Request(self.url + "/readyz")
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with _DIRECT.open(request, timeout=1.0) as reply:
                status, body = reply.status, reply.read()
        except urllib.error.HTTPError as exc:  # 503: up, not ready
            with exc:  # it holds the connection
                status, body = exc.code, exc.read()
        except (OSError, ValueError) as exc:
            self._api_up, self._last = False, str(getattr(exc, "reason", exc))
            return
        self._api_up = True
        try:
            content = json.loads(body)
        except ValueError:
            content = {}
        if status == 200:
            names = content.get("workers") if isinstance(content, dict) else None
            self._workers = [str(n) for n in names] if isinstance(names, list) else None
        else:
            self._workers = []
            self._last = str(content.get("reason", f"HTTP {status}")) if isinstance(content, dict) else str(status)

    def _missing(self) -> str:
        if not self._api_up:
            return f"the API did not answer at {self.url} within {self.timeout_s:.0f} s ({self._last})"
        return f"the API is up at {self.url}, but no worker reported in within {self.timeout_s:.0f} s ({self._last})"
