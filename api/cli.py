"""`lora-server` (also `kkit-lora-server`, the seed's name): run the service on one machine."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from api.launcher import ServeOptions, serve


def _serve_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base_path", "--base-path", dest="base_path", type=Path,
                        default=Path(os.environ.get("LORA_BASE_PATH", "./models")),
                        help="folder for datasets and trained adapters (default ./models)")  # fmt: skip
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--redis-url", "--redis_url", dest="redis_url", default=None,
                        help="use this Redis instead of starting an embedded one (or LORA_REDIS_URL)")  # fmt: skip
    parser.add_argument("--gpus", default=None, help="comma-separated GPU ids: one worker pinned to each")
    parser.add_argument("--workers", type=int, default=1, help="worker processes when --gpus is not given")
    parser.add_argument("--log-level", default="info")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lora-server", description="LoRA fine-tuning server")
    _serve_parser(parser)
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    raise SystemExit(main())
