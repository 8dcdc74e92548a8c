"""The client commands (`submit`, `status`, `jobs`, `watch`, `logs`, `cancel`, `pause`, `resume`, `download`,
`chat`, `models`): each one HTTP call or a few, through client.LoraClient, printed for a person (or as JSON
with --json)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cli.progress import LiveProgress, ProgressView, progress_line
from client import LoraClient
from client.chat import TerminalStream
from shared.events import JobEvent
from shared.job_api import JobPublic
from shared.jobs import JobStatus, Progress
from shared.metrics import EpochEnd, StepMetrics

EXIT_FAILED = 1
EXIT_CANCELLED = 3
EXIT_INTERRUPTED = 130


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


def _follow(client: LoraClient, job_id: str) -> int:
    view = ProgressView(sys.stderr)
    live = LiveProgress(client, job_id)
    try:
        for event in client.stream(job_id):
            if isinstance(event.data, StepMetrics):
                view.update(live.apply(event.data), eval_loss=live.eval_loss)
            elif isinstance(event.data, EpochEnd):
                live.eval_loss = event.data.eval_loss if event.data.eval_loss is not None else live.eval_loss
            else:
                view.message(f"{event.type}: {event.message}")
    except KeyboardInterrupt:
        view.end_line()
        print(f"stopped following; the job goes on (lora-server cancel {job_id} stops it)", file=sys.stderr)
        return EXIT_INTERRUPTED
    job = client.job(job_id)
    view.finish(job.status)
    return _outcome(job)


def _outcome(job: JobPublic) -> int:
    """Say how an ended job ended; its exit code (0 succeeded, 3 cancelled, 1 failed)."""
    if job.status is JobStatus.succeeded:
        where = f"adapter at {job.model_path}" if job.kind == "train" else f"merged model at {job.model_path}"
        named = f" ({job.fine_tuned_model})" if job.fine_tuned_model else ""
        print(f"{job.id} succeeded: {where}{named}", file=sys.stderr)
        return 0
    print(f"{job.id} {job.status.value}: {job.error or job.message}", file=sys.stderr)
    return EXIT_CANCELLED if job.status is JobStatus.cancelled else EXIT_FAILED


def _job_id(text: str) -> str:
    """A job id as given, or the job a `ft:` model name names (`ft:{base}:{suffix}:{job}[:ckpt-step-N]`)."""
    if not text.startswith("ft:"):
        return text
    parts = text.split(":")
    if parts[-1].startswith("ckpt-step-"):
        parts = parts[:-1]
    return parts[-1]


def _cmd_watch(client: LoraClient, args: argparse.Namespace) -> int:
    """Follow any job (however and by whoever it was started) until it ends; exit with its outcome."""
    job = client.job(_job_id(args.job_id))  # an unknown id is a 404 here, before anything is drawn
    what = "merge of " + (job.source_job or "?") if job.kind == "merge" else "training"
    print(f"{job.id}  {what}  {job.model or ''}  ({job.status.value})", file=sys.stderr)
    if job.status.terminal:
        print("  " + progress_line(job.progress, status=job.status), file=sys.stderr)
        return _outcome(job)
    return _follow(client, job.id)


def _event_line(event: JobEvent) -> str:
    at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event.created_at))
    return f"{at}  {event.type:<16} {event.message}"


def _cmd_logs(client: LoraClient, args: argparse.Namespace) -> int:
    """The job's events, oldest first; with --follow, as they happen until the job ends (exit: its outcome)."""
    job_id = _job_id(args.job_id)
    if args.follow:
        try:
            for event in client.stream(job_id):
                print(_event_line(event), flush=True)
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
        return _outcome(client.job(job_id))
    cursor: str | None = None
    while True:
        page = client.events(job_id, after=cursor, limit=1000)
        for event in page.data:
            print(_event_line(event))
        cursor = page.last_id
        if not page.has_more:
            return 0


def _cmd_submit(client: LoraClient, args: argparse.Namespace) -> int:
    if not args.data.is_file():
        raise SystemExit(f"no such file: {args.data}")
    config = {**_load_config(args.config), **_parse_set(args.set)}
    accepted = client.submit(args.data, config, queue=args.queue)
    print(accepted.job_id)
    print(accepted.message, file=sys.stderr)
    return _follow(client, accepted.job_id) if args.follow else 0


def _cmd_status(client: LoraClient, args: argparse.Namespace) -> int:
    if args.job_id:
        job = client.job(args.job_id)
        if args.json:
            print(job.model_dump_json(indent=2))
            return 0
        print(f"{job.id}  {job.status.value}" + (f"  ({job.kind})" if job.kind != "train" else ""))
        print("  " + progress_line(job.progress, status=job.status))
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
        print("  " + progress_line(p, status=status.job_status))
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
        # a Tinker hosting job has no planned total: its clients' optimizer steps so far
        step = f"{p.current_step}/{p.total_steps}" if p.total_steps or job.kind != "tinker" else str(p.current_step)
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


def _cmd_pause(client: LoraClient, args: argparse.Namespace) -> int:
    job = client.pause(args.job_id)
    print(f"{job.id} {job.status.value}: {job.message}")
    return 0


def _cmd_resume(client: LoraClient, args: argparse.Namespace) -> int:
    job = client.resume(args.job_id)
    where = f" (position {job.queue_position} in line)" if job.queue_position else ""
    print(f"{job.id} {job.status.value}{where}: {job.message}")
    return 0


def _cmd_download(client: LoraClient, args: argparse.Namespace) -> int:
    files = client.download(args.job_id, args.dest, checkpoint=args.checkpoint)
    print(f"{len(files)} files in {args.dest}")
    return 0


def _question(arg: str) -> str:
    """The question as given, or read from stdin when it is `-` (a long prompt, a file piped in)."""
    text = sys.stdin.read() if arg == "-" else arg
    if not text.strip():
        raise SystemExit("chat: the question is empty" + (" (nothing on stdin)" if arg == "-" else ""))
    return text


def _cmd_chat(client: LoraClient, args: argparse.Namespace) -> int:
    question = _question(args.question)
    pieces = client.chat_stream(
        args.model, question, system=args.system, max_tokens=args.max_tokens, temperature=args.temperature
    )
    wrote = False
    safe = TerminalStream()  # the model's text, never its escape sequences or control characters
    try:
        for piece in pieces:  # each piece as it arrives: the answer reads like it is typed
            sys.stdout.write(safe.feed(piece))
            sys.stdout.flush()
            wrote = True
    finally:
        if wrote:  # ends the line even when the stream breaks, so the error starts on its own
            sys.stdout.write(safe.flush() + "\n")
            sys.stdout.flush()
    return 0


def _cmd_models(client: LoraClient, args: argparse.Namespace) -> int:
    listing = client.models()
    if args.json:
        print(listing.model_dump_json(indent=2))
        return 0
    if not listing.data:
        print("no models", file=sys.stderr)
        return 0
    width = max(len("MODEL"), *(len(m.id) for m in listing.data))
    print(f"{'MODEL':<{width}}  {'OWNER':<20}  CREATED")
    for m in listing.data:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m.created))
        print(f"{m.id:<{width}}  {m.owned_by:<20}  {created}")
    return 0


COMMANDS = {
    "submit": _cmd_submit,
    "status": _cmd_status,
    "jobs": _cmd_jobs,
    "watch": _cmd_watch,
    "logs": _cmd_logs,
    "cancel": _cmd_cancel,
    "pause": _cmd_pause,
    "resume": _cmd_resume,
    "download": _cmd_download,
    "chat": _cmd_chat,
    "models": _cmd_models,
}
