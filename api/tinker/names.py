"""Tinker's names for things: model ids, `tinker://<model id>/<weights|sampler_weights>/<name>` paths, and the
Checkpoint objects the SDK lists."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from api.tinker.errors import bad_request
from shared.tinker_store import CheckpointInfo

SCHEME = "tinker://"
SEGMENTS = {"weights": "training", "sampler_weights": "sampler"}


def model_id(session_id: str, model_seq_id: int) -> str:
    """The id the SDK itself makes up for a model it creates from a checkpoint: the server uses the same."""
    return f"{session_id}:train:{model_seq_id}"


def sampling_session_id(owner: str, seq_id: int) -> str:
    return f"{owner}:sample:{seq_id}"


@dataclass(frozen=True)
class TinkerPath:
    run_id: str  # the training model's id
    segment: str  # weights | sampler_weights
    name: str

    @property
    def checkpoint_id(self) -> str:
        return f"{self.segment}/{self.name}"

    def __str__(self) -> str:
        return f"{SCHEME}{self.run_id}/{self.segment}/{self.name}"


def parse_path(call: str, path: str, field: str = "path") -> TinkerPath:
    if not path.startswith(SCHEME):
        raise bad_request(call, field, f"{path[:120]!r} is not a tinker:// path")
    parts = path[len(SCHEME) :].split("/")
    if len(parts) != 3 or not all(parts) or parts[1] not in SEGMENTS:
        raise bad_request(call, field, f"{path[:120]!r} is not tinker://<training run>/weights|sampler_weights/<name>")
    return TinkerPath(*parts)


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat().replace("+00:00", "Z")


def checkpoint_json(info: CheckpointInfo) -> dict[str, Any]:
    segment = "weights" if info.checkpoint_type == "training" else "sampler_weights"
    body: dict[str, Any] = {
        "checkpoint_id": f"{segment}/{info.name}",
        "checkpoint_type": info.checkpoint_type,
        "time": iso(info.created_ms),
        "tinker_path": info.tinker_path,
        "public": False,
    }
    if info.size_bytes is not None:
        body["size_bytes"] = info.size_bytes
    return body
