"""`lora-server` (also `kkit-lora-server`, the seed's name): run the service, or talk to a running one.

    lora-server --base_path DIR --port N        run the service on this machine (same as `serve`)
    lora-server submit DATA.jsonl [--config FILE] [--set key=value ...] [--follow]
    lora-server status [JOB_ID]
    lora-server jobs [--status S]
    lora-server cancel JOB_ID
    lora-server download JOB_ID DIR

The client commands use only the HTTP API: `--url` (or LORA_URL), key from `--api-key` (or LORA_API_KEY).
Exit codes: 0 ok; 1 error or failed job; 3 cancelled job; 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import httpx

from api.client import DEFAULT_URL, ApiClientError, LoraClient, UnsafeArchiveError
from api.launcher import ServeOptions, serve
from shared.jobs import JobStatus, Progress

EXIT_FAILED = 1
EXIT_CANCELLED = 3
EXIT_INTERRUPTED = 130


def _serve_parser(parser: argparse.ArgumentParser, *, keep_parent_values: bool = False) -> None:
    """The service's options; on `serve` they default to what was given before the command."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if keep_parent_values else value

    parser.add_argument("--base_path", "--base-path", dest="base_path", type=Path,
                        default=default(Path(os.environ.get("LORA_BASE_PATH", "./models"))),
                        help="folder for datasets and trained adapters (default ./models)")  # fmt: skip
    parser.add_argument("--port", type=int, default=default(8000))
    parser.add_argument("--host", default=default("127.0.0.1"), help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--redis-url", "--redis_url", dest="redis_url", default=default(None),
                        help="use this Redis instead of starting an embedded one (or LORA_REDIS_URL)")  # fmt: skip
    parser.add_argument("--gpus", default=default(None), help="comma-separated GPU ids: one worker pinned to each")
    parser.add_argument("--workers", type=int, default=default(1), help="worker processes when --gpus is not given")
    parser.add_argument("--log-level", default=default("info"))


def _run_serve(args: argparse.Namespace) -> int:
    opts = ServeOptions(
        base_path=args.base_path,
        host=args.host,
        port=args.port,
        redis_url=args.redis_url,
        gpus=[g.strip() for g in args.gpus.split(",")] if args.gpus else None,
        workers=max(1, args.workers),
        log_level=args.log_level,
    )
    return serve(opts)


# ---------------------------------------------------------------- progress display


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = max(0, round(seconds))
    h, m, sec = s // 3600, s % 3600 // 60, s % 60
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def progress_line(p: Progress, width: int = 24, eval_loss: float | None = None) -> str:
    """`[#####-----]  40/200  20%  epoch 3/10  loss 5.1234  eval 5.3  1234 tok/s  ETA 0:12`"""
    frac = min(1.0, p.current_step / p.total_steps) if p.total_steps else 0.0
    filled = round(frac * width)
    parts = [
        f"[{'#' * filled}{'-' * (width - filled)}]",
        f"{p.current_step}/{p.total_steps or '?'}",
        f"{frac * 100:3.0f}%",
        f"epoch {p.current_epoch}/{p.total_epochs or '?'}",
    ]
    if p.loss is not None:
        parts.append(f"loss {p.loss:.4f}")
    if eval_loss is not None:
        parts.append(f"eval {eval_loss:.4f}")
    if p.tokens_per_second:
        parts.append(f"{p.tokens_per_second:.0f} tok/s")
    parts.append(f"ETA {_duration(p.eta_seconds)}")
    return "  ".join(parts)


class ProgressView:
    """One redrawn line on a terminal; otherwise a line at most every `every_s` seconds, and the latest
    state before any other message and at the end, so the log never stops short of where the job got."""

    def __init__(self, out: TextIO, every_s: float = 1.0) -> None:
        self.out = out
        self.tty = out.isatty()
        self.every_s = every_s
        self._last = 0.0
        self._drawn = False  # terminal: a bar is on the current line
        self._pending: str | None = None  # log: the latest line not written yet

    def update(self, p: Progress, eval_loss: float | None = None) -> None:
        now = time.monotonic()
        line = progress_line(p, eval_loss=eval_loss)
        final = bool(p.total_steps) and p.current_step >= p.total_steps
        if self.tty:
            self.out.write("\r\033[K" + line)
            self._drawn = True
        elif final or now - self._last >= self.every_s:
            self.out.write(line + "\n")
            self._pending = None
        else:
            self._pending = line
            return
        self._last = now
        self.out.flush()

    def message(self, text: str) -> None:
        self.end_line()
        self.out.write(text + "\n")
        self.out.flush()

    def end_line(self) -> None:
        if self._drawn:
            self.out.write("\n")
            self._drawn = False
        if self._pending is not None:
            self.out.write(self._pending + "\n")
            self._pending = None


# ---------------------------------------------------------------- client commands


def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    """`key=value` pairs; a value is JSON when it parses as JSON, else the plain string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--set expects key=value, got {item!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except ValueError:
            out[key.strip()] = raw
    return out


def _load_config(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--config {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise SystemExit(f"--config {path}: expected a JSON object")
    return data


class LiveProgress:
    """What to show: each metrics event's numbers over the job record's totals and ETA (re-read every few s)."""

    def __init__(self, client: LoraClient, job_id: str, refresh_s: float = 2.0) -> None:
        self.client, self.job_id, self.refresh_s = client, job_id, refresh_s
        self.record = Progress()
        self.eval_loss: float | None = None
        self._read_at = -refresh_s

    def _record(self) -> Progress:
        interval = self.refresh_s if self.record.total_steps else 0.5
        if time.monotonic() - self._read_at >= interval:
            # On a failed read keep the last record: the stream is what matters.
            with contextlib.suppress(ApiClientError, httpx.TransportError):
                self.record = self.client.job(self.job_id).progress
            self._read_at = time.monotonic()
        return self.record

    def apply(self, data: dict[str, Any]) -> Progress:
        base = self._record()
        step = int(data.get("step", data.get("current_step", base.current_step)) or 0)
        total = int(data.get("total_steps") or base.total_steps or 0)
        eta = data.get("eta_seconds")
        if eta is None and total:
            if base.eta_seconds is not None and 0 < base.current_step < step:
                eta = base.eta_seconds * (total - step) / max(1, total - base.current_step)
            elif data.get("step_seconds"):
                eta = float(data["step_seconds"]) * (total - step)
            else:
                eta = base.eta_seconds
        return base.model_copy(
            update={
                "current_step": step,
                "total_steps": total,
                "current_epoch": int(data.get("epoch", data.get("current_epoch", base.current_epoch)) or 0),
                "loss": data.get("loss", base.loss),
                "tokens_per_second": data.get("tokens_per_second", base.tokens_per_second),
                "eta_seconds": eta,
            }
        )


def _follow(client: LoraClient, job_id: str) -> int:
    view = ProgressView(sys.stderr)
    live = LiveProgress(client, job_id)
    try:
        for event in client.stream(job_id):
            if event.type == "metrics":
                view.update(live.apply(event.data), eval_loss=live.eval_loss)
            elif event.type == "epoch":
                if event.data.get("eval_loss") is not None:
                    live.eval_loss = float(event.data["eval_loss"])
            else:
                view.message(f"{event.type}: {event.message}")
    except KeyboardInterrupt:
        view.end_line()
        print(f"stopped following; the job goes on (lora-server cancel {job_id} stops it)", file=sys.stderr)
        return EXIT_INTERRUPTED
    view.end_line()
    job = client.job(job_id)
    if job.status is JobStatus.succeeded:
        print(f"{job_id} succeeded: adapter at {job.model_path}", file=sys.stderr)
        return 0
    print(f"{job_id} {job.status.value}: {job.error or job.message}", file=sys.stderr)
    return EXIT_CANCELLED if job.status is JobStatus.cancelled else EXIT_FAILED


def _cmd_submit(client: LoraClient, args: argparse.Namespace) -> int:
    if not args.data.is_file():
        raise SystemExit(f"no such file: {args.data}")
    config = {**_load_config(args.config), **_parse_set(args.set)}
    accepted = client.submit(args.data, config)
    print(accepted.job_id)
    print(accepted.message, file=sys.stderr)
    return _follow(client, accepted.job_id) if args.follow else 0


def _cmd_status(client: LoraClient, args: argparse.Namespace) -> int:
    if args.job_id:
        job = client.job(args.job_id)
        if args.json:
            print(job.model_dump_json(indent=2))
            return 0
        print(f"{job.id}  {job.status.value}")
        print("  " + progress_line(job.progress))
        detail = job.error or job.message
        if detail:
            print(f"  {detail}")
        if job.model_path:
            print(f"  adapter: {job.model_path}")
        return 0
    status = client.status()
    if args.json:
        print(status.model_dump_json(indent=2, exclude_none=True))
        return 0
    if status.job_id and status.job_status:
        print(f"{status.status}  {status.job_id}  ({status.job_status.value})")
    else:
        print(status.status)
    if status.job_id:
        p = Progress.model_validate(status.model_dump())
        print("  " + progress_line(p))
    print(f"  {status.error or status.message}")
    if status.model_path:
        print(f"  adapter: {status.model_path}")
    return 0


def _cmd_jobs(client: LoraClient, args: argparse.Namespace) -> int:
    page = client.jobs(status=args.status, limit=args.limit)
    if args.json:
        print(page.model_dump_json(indent=2))
        return 0
    if not page.data:
        print("no jobs", file=sys.stderr)
        return 0
    print(f"{'JOB':<26} {'STATUS':<10} {'STEP':>11} {'LOSS':>8}  {'CREATED':<19}  DETAIL")
    for job in page.data:
        p = job.progress
        step = f"{p.current_step}/{p.total_steps}"
        loss = f"{p.loss:.4f}" if p.loss is not None else "-"
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.created_at))
        detail = (job.error or job.model_path or job.message or "").replace("\n", " ")[:60]
        print(f"{job.id:<26} {job.status.value:<10} {step:>11} {loss:>8}  {created:<19}  {detail}")
    if page.has_more:
        print(f"(more: --limit {args.limit * 2})", file=sys.stderr)
    return 0


def _cmd_cancel(client: LoraClient, args: argparse.Namespace) -> int:
    result = client.cancel(args.job_id)
    print(f"{result.job_id} {result.status}: {result.message}")
    return 0


def _cmd_download(client: LoraClient, args: argparse.Namespace) -> int:
    files = client.download(args.job_id, args.dest, checkpoint=args.checkpoint)
    print(f"{len(files)} files in {args.dest}")
    return 0


_COMMANDS = {
    "submit": _cmd_submit,
    "status": _cmd_status,
    "jobs": _cmd_jobs,
    "cancel": _cmd_cancel,
    "download": _cmd_download,
}


def _client_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("LORA_URL", DEFAULT_URL),
                        help=f"the server (default LORA_URL or {DEFAULT_URL})")  # fmt: skip
    common.add_argument("--api-key", default=os.environ.get("LORA_API_KEY"),
                        help="Bearer key (default LORA_API_KEY)")  # fmt: skip
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-server",
        description="LoRA fine-tuning server. With no command: run the service (like `serve`).",
        epilog="exit codes: 0 ok, 1 error or failed job, 3 cancelled job, 130 interrupted",
    )
    _serve_parser(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _serve_parser(
        sub.add_parser("serve", help="run the service on this machine (the default)"), keep_parent_values=True
    )
    common = _client_options()

    p = sub.add_parser("submit", parents=[common], help="upload a dataset and start a job")
    p.add_argument("data", type=Path, metavar="DATA.jsonl")
    p.add_argument("--config", type=Path, help="a JSON file with the training config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config field (value parsed as JSON when it parses, else a string); repeatable")  # fmt: skip
    p.add_argument("--follow", "-f", action="store_true", help="show progress until the job ends")

    p = sub.add_parser("status", parents=[common], help="the current job (or the one named)")
    p.add_argument("job_id", nargs="?")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("jobs", parents=[common], help="list jobs, newest first")
    p.add_argument("--status", choices=[s.value for s in JobStatus])
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("cancel", parents=[common], help="cancel a job")
    p.add_argument("job_id")

    p = sub.add_parser("download", parents=[common], help="fetch a job's adapter into a folder")
    p.add_argument("job_id")
    p.add_argument("dest", type=Path, metavar="DIR")
    p.add_argument("--checkpoint", type=int, help="a checkpoint's step instead of the final adapter")

    p = sub.add_parser("merge", help="fold an adapter into its base model, on this machine")
    p.add_argument("adapter_dir", type=Path)
    p.add_argument("output_dir", type=Path)
    p.add_argument("--base", default=None, help="base model (default: the one the adapter was trained on)")
    return parser


def _run_merge(args: argparse.Namespace) -> int:
    """Merging needs torch: it runs as `python -m worker.merge`, keeping the API side free of it."""
    cmd = [sys.executable, "-m", "worker.merge", str(args.adapter_dir), str(args.output_dir)]
    if args.base:
        cmd += ["--base", args.base]
    try:
        return subprocess.run(cmd, check=False).returncode
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _run_client(args: argparse.Namespace) -> int:
    try:
        with LoraClient(args.url, api_key=args.api_key) as client:
            return _COMMANDS[args.command](client, args)
    except ApiClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
    except httpx.TransportError as exc:
        print(f"error: cannot reach {args.url}: {exc}", file=sys.stderr)
    except UnsafeArchiveError as exc:
        print(f"error: refused archive: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in (None, "serve"):
        return _run_serve(args)
    if args.command == "merge":
        return _run_merge(args)
    return _run_client(args)


if __name__ == "__main__":
    raise SystemExit(main())
