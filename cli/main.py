"""`lora-server` (also `kkit-lora-server`, the seed's name): run the service, or talk to a running one.

    lora-server --base_path DIR --port N        run the service on this machine (same as `serve`)
    lora-server submit DATA.jsonl [--config FILE] [--set key=value ...] [--queue] [--follow]
    lora-server status [JOB_ID]
    lora-server jobs [--status S]
    lora-server watch JOB_ID                    follow any job until it ends (exit code: its outcome)
    lora-server logs JOB_ID [--follow]          its events; --follow: as they happen, until it ends
    lora-server cancel JOB_ID
    lora-server pause JOB_ID | resume JOB_ID
    lora-server download JOB_ID DIR
    lora-server chat JOB_OR_MODEL "question" [--system S] [--max-tokens N] [--temperature T]   (question `-`: stdin)
    lora-server models

The client commands use only the HTTP API: `--url` (or LORA_URL), key from `--api-key` (or LORA_API_KEY).
Exit codes: 0 ok; 1 error or failed job; 3 cancelled job; 130 interrupted; 141 output closed early (`| head`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from cli.commands import COMMANDS, EXIT_FAILED, EXIT_INTERRUPTED
from client import DEFAULT_URL, ApiClientError, ChatStreamError, LoraClient, UnsafeArchiveError
from client.chat import terminal_safe
from launcher.serve import ServeOptions, serve
from shared.jobs import JobStatus


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
    p.add_argument("--queue", action="store_true",
                   help="when every slot is taken, wait in line for one (FIFO) instead of failing with 409")  # fmt: skip

    p = sub.add_parser("status", parents=[common], help="the current job (or the one named)")
    p.add_argument("job_id", nargs="?")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("jobs", parents=[common], help="list jobs, newest first")
    p.add_argument("--status", choices=[s.value for s in JobStatus])
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("watch", parents=[common],
                       help="follow a job (any: /train, /v1, a merge; whoever started it) with a progress bar "
                            "until it ends; the exit code says how it ended")  # fmt: skip
    p.add_argument("job_id", metavar="JOB_ID", help="a job id (or a ft: model name)")

    p = sub.add_parser("logs", parents=[common], help="a job's events, oldest first")
    p.add_argument("job_id", metavar="JOB_ID", help="a job id (or a ft: model name)")
    p.add_argument("--follow", "-f", action="store_true",
                   help="keep printing events as they happen until the job ends; the exit code says how it ended")  # fmt: skip

    p = sub.add_parser("cancel", parents=[common], help="cancel a job")
    p.add_argument("job_id")

    p = sub.add_parser("pause", parents=[common], help="pause a job: it saves its state and frees its slot")
    p.add_argument("job_id")

    p = sub.add_parser("resume", parents=[common], help="queue a paused job again; it continues where it stopped")
    p.add_argument("job_id")

    p = sub.add_parser("download", parents=[common], help="fetch a job's adapter into a folder")
    p.add_argument("job_id")
    p.add_argument("dest", type=Path, metavar="DIR")
    p.add_argument("--checkpoint", type=int, help="a checkpoint's step instead of the final adapter")

    p = sub.add_parser("chat", parents=[common], help="ask a fine-tuned (or base) model; the answer streams out")
    p.add_argument("model", metavar="JOB_OR_MODEL", help="a job id, a ft: model name or a base model")
    p.add_argument("question", help="the question; - reads it from stdin")
    p.add_argument("--system", help="a system prompt")
    p.add_argument("--max-tokens", type=int, help="most tokens to generate (default: the server's)")
    p.add_argument("--temperature", type=float, help="0 picks the likeliest token each time (default: the server's)")

    p = sub.add_parser("models", parents=[common], help="models a chat can name: base models and fine-tuned ones")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("merge", help="fold an adapter into its base model, on this machine")
    p.add_argument("adapter_dir", type=Path)
    p.add_argument("output_dir", type=Path)
    p.add_argument("--base", default=None, help="base model (default: the one the adapter was trained on)")
    return parser


def _run_merge(args: argparse.Namespace) -> int:
    """Merging needs torch: it runs as `python -m worker.training.merge`, keeping the API side free of it."""
    cmd = [sys.executable, "-m", "worker.training.merge", str(args.adapter_dir), str(args.output_dir)]
    if args.base:
        cmd += ["--base", args.base]
    try:
        return subprocess.run(cmd, check=False).returncode
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


# What a shell reports for a command that SIGPIPE ended (128 + 13), as `yes | head` does. Not 0: the command
# stopped before it finished, and for `watch`/`logs --follow` 0 would claim the job succeeded; `set -o pipefail`
# scripts get the same answer they get from any Unix tool whose reader left.
EXIT_OUTPUT_CLOSED = 141


def _stdout_closed() -> int:
    """The reader of stdout left (`lora-server logs JOB | head`): stop quietly, as the Python docs' "Note on
    SIGPIPE" advises. Stdout goes to /dev/null so the interpreter's last flush of what is still buffered does
    not raise again at exit. SIGPIPE is not restored to its default instead: it would also kill the CLI,
    silently, on a write to a server that dropped the connection, which httpx reports as an error."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return EXIT_OUTPUT_CLOSED


def _run_client(args: argparse.Namespace) -> int:
    try:
        with LoraClient(args.url, api_key=args.api_key) as client:
            code = COMMANDS[args.command](client, args)
            sys.stdout.flush()  # a closed reader is met here, not in the interpreter's flush at exit
            return code
    except BrokenPipeError:
        return _stdout_closed()
    except ApiClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
    except httpx.TransportError as exc:
        print(f"error: cannot reach {args.url}: {exc}", file=sys.stderr)
    except UnsafeArchiveError as exc:
        print(f"error: refused archive: {exc}", file=sys.stderr)
    except ChatStreamError as exc:
        print(f"error: the answer failed: {terminal_safe(str(exc))}", file=sys.stderr)
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
