"""Files of the OpenAI surface (`/v1/files`): the record kept per file, and the one write the worker
makes too (registering a job's result file), so both sides name a file's hash and index once.

Two kinds of file share one index (`keys.FILES`): training data a client uploaded (`fine-tune`) and
a training job's step metrics (`fine-tune-results`, written by the worker, see `worker.training.results_log`).
A result file's id is derived from its job's (`result_file_id`), so the job object can name it
without a lookup table and registering it twice (a redelivered job) is harmless.
"""

from __future__ import annotations

import json
import time
from typing import Literal

import redis
from pydantic import BaseModel, ConfigDict

from shared import keys
from shared.preference import DataKind

FilePurpose = Literal["fine-tune", "fine-tune-results"]
UPLOAD_PURPOSE: FilePurpose = "fine-tune"
RESULTS_PURPOSE: FilePurpose = "fine-tune-results"
RESULT_FILE_PREFIX = "file-results-"


class FileRecord(BaseModel):
    """One file of `/v1/files` (one hash per file)."""

    model_config = ConfigDict(extra="ignore")

    id: str
    bytes: int
    created_at: int
    filename: str  # the client's name (or ours, for result files), for display only; never used as a path
    purpose: FilePurpose = UPLOAD_PURPOSE  # records written before result files existed carry "fine-tune"
    path: str  # the file on the volume: normalised JSON Lines, or a job's metrics CSV
    num_records: int  # training records, or logged steps (CSV rows)
    kind: DataKind = (
        "chat"  # uploads: chat records (supervised) or preference pairs (DPO); records from before DPO are chat
    )


def result_file_id(job_id: str) -> str:
    """The id of a job's result file (`file-results-job-...`)."""
    return RESULT_FILE_PREFIX + job_id


def add_file(client: redis.Redis, record: FileRecord) -> None:
    """Store `record` and index it by its creation time (idempotent for one id)."""
    fields = {name: json.dumps(value) for name, value in record.model_dump(mode="json").items()}
    pipe = client.pipeline()
    pipe.hset(keys.file_key(record.id), mapping=fields)  # type: ignore[arg-type]
    pipe.zadd(keys.FILES, {record.id: int(time.time() * 1000)})
    pipe.execute()


def remove_file(client: redis.Redis, file_id: str) -> bool:
    """Forget a file's record; True when there was one."""
    pipe = client.pipeline()
    pipe.delete(keys.file_key(file_id))
    pipe.zrem(keys.FILES, file_id)
    deleted, _ = pipe.execute()
    return bool(deleted)
