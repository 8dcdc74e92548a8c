"""Redis access for the OpenAI surface: uploaded files, and the OpenAI-only fields of jobs.

Our job records (shared.store.JobStore) stay the source of truth for state; this module only
keeps what OpenAI's objects carry beyond them. Each hash field holds a JSON value.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal, TypeVar, cast

import redis
from fastapi import Depends
from pydantic import BaseModel

from api.deps import StoreDep
from api.openai.records import FileRecord, OpenAIJobRecord
from shared import files, keys
from shared.files import result_file_id

M = TypeVar("M", bound=BaseModel)
Order = Literal["asc", "desc"]


class UnknownCursorError(ValueError):
    """An `after` cursor that names no item of the list."""


def _to_hash(record: BaseModel) -> dict[str, str]:
    return {name: json.dumps(value) for name, value in record.model_dump(mode="json").items()}


def _from_hash(model: type[M], fields: dict[str, str]) -> M | None:
    if not fields:
        return None
    return model.model_validate({name: json.loads(value) for name, value in fields.items()})


class OpenAIStore:
    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    # Files.
    def add_file(self, record: FileRecord) -> None:
        files.add_file(self.client, record)

    def get_file(self, file_id: str) -> FileRecord | None:
        return _from_hash(FileRecord, cast(dict[str, str], self.client.hgetall(keys.file_key(file_id))))

    def remove_file(self, file_id: str) -> bool:
        return files.remove_file(self.client, file_id)

    def result_files(self, job_id: str) -> list[str]:
        """The job's result file, while it is registered (deleting it takes it off the job too)."""
        file_id = result_file_id(job_id)
        return [file_id] if self.client.exists(keys.file_key(file_id)) else []

    def list_files(self, *, after: str | None, limit: int, order: Order) -> tuple[list[FileRecord], bool]:
        ids, has_more = self._page(keys.FILES, after=after, limit=limit, order=order)
        pipe = self.client.pipeline(transaction=False)
        for file_id in ids:
            pipe.hgetall(keys.file_key(file_id))
        records = [_from_hash(FileRecord, fields) for fields in pipe.execute()]
        return [r for r in records if r is not None], has_more

    # Jobs.
    def put_job(self, job_id: str, record: OpenAIJobRecord) -> None:
        self.client.hset(keys.openai_job_key(job_id), mapping=_to_hash(record))  # type: ignore[arg-type]

    def get_job(self, job_id: str) -> OpenAIJobRecord | None:
        return _from_hash(OpenAIJobRecord, cast(dict[str, str], self.client.hgetall(keys.openai_job_key(job_id))))

    def remove_job(self, job_id: str) -> None:
        self.client.delete(keys.openai_job_key(job_id))

    def job_ids(self, *, after: str | None, limit: int) -> tuple[list[str], bool]:
        """Job ids newest first (all jobs, however submitted), starting after the job `after`."""
        return self._page(keys.JOBS, after=after, limit=limit, order="desc")

    def _page(self, index: str, *, after: str | None, limit: int, order: Order) -> tuple[list[str], bool]:
        start = 0
        if after is not None:
            rank = self.client.zrevrank(index, after) if order == "desc" else self.client.zrank(index, after)
            if rank is None:
                raise UnknownCursorError(after)
            start = int(cast(int, rank)) + 1
        end = start + limit  # one more than asked for, to tell whether more follow
        rows = self.client.zrevrange(index, start, end) if order == "desc" else self.client.zrange(index, start, end)
        ids = [str(x) for x in cast(list[str], rows)]
        return ids[:limit], len(ids) > limit


class JobFields:
    """The OpenAI-only fields of a job being submitted, kept beside it (see api.submission.Companion)."""

    def __init__(self, store: OpenAIStore, record: OpenAIJobRecord) -> None:
        self.store, self.record = store, record

    def attach(self, job_id: str) -> None:
        self.store.put_job(job_id, self.record)

    def detach(self, job_id: str) -> None:
        self.store.remove_job(job_id)


def _openai_store(store: StoreDep) -> OpenAIStore:
    return OpenAIStore(store.client)


OpenAIStoreDep = Annotated[OpenAIStore, Depends(_openai_store)]
