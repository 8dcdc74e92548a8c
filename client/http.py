"""A small typed client for the lora-server HTTP API (httpx and the API's pydantic models from `shared`; no
web framework, no training stack).

Usage:

client = LoraClient("http://127.0.0.1:8000", api_key=os.environ.get("LORA_API_KEY"))
job_id = client.submit(Path("data.jsonl"), {"epochs": 3}).job_id
for event in client.stream(job_id):
    ...
client.download(job_id, Path("adapter"))
for piece in client.chat_stream(job_id, "What color is the sky?"):
    print(piece, end="", flush=True)
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar, cast

import httpx
from pydantic import BaseModel

from client.archive import extract_tar_safely
from client.chat import ModelList, chat_messages, chunk_texts
from client.sse import sse_blocks
from shared.events import JobEvent
from shared.job_api import (
    ArtifactsPublic,
    CancelPublic,
    CheckpointPage,
    EventPage,
    JobPage,
    JobPublic,
    SeedStatusPublic,
    TrainAccepted,
)
from shared.jobs import JobStatus

DEFAULT_URL = "http://127.0.0.1:8000"
M = TypeVar("M", bound=BaseModel)


class ApiClientError(Exception):
    """The API answered with an error status."""

    def __init__(self, status_code: int, detail: str, body: Any = None) -> None:
        super().__init__(f"HTTP {status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail
        self.body = body


class LoraClient:
    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> LoraClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    # ---- plumbing ----
    @staticmethod
    def _check(response: httpx.Response) -> httpx.Response:
        if response.is_success:
            return response
        try:
            body = response.json()
        except ValueError:
            body = response.text
        detail = body.get("detail") if isinstance(body, dict) else None
        error = body.get("error") if isinstance(body, dict) else None
        if detail is None and isinstance(error, dict):  # the /v1 routes answer in OpenAI's envelope
            detail = error.get("message")
        raise ApiClientError(response.status_code, str(detail or body or response.reason_phrase), body)

    def _get(self, model: type[M], path: str, **params: Any) -> M:
        clean = {k: v for k, v in params.items() if v is not None}
        return model.model_validate_json(self._check(self.http.get(path, params=clean)).content)

    # ---- the API ----
    def submit(self, data: Path, config: Mapping[str, Any] | None = None, *, queue: bool = False) -> TrainAccepted:
        """Upload a dataset file with a training config (missing fields take their defaults). With
        `queue`, a job that finds every slot taken waits in line for one instead of a 409."""
        with data.open("rb") as fh:
            files: dict[str, tuple[str | None, str | IO[bytes], str]] = {
                "config": (None, json.dumps(dict(config or {})), "application/json"),
                "file": (data.name, fh, "application/octet-stream"),
            }
            response = self.http.post(
                "/train",
                files=files,
                params={"queue": "true"} if queue else None,
                timeout=httpx.Timeout(self.http.timeout.read, write=None),
            )
        return TrainAccepted.model_validate_json(self._check(response).content)

    def status(self) -> SeedStatusPublic:
        return self._get(SeedStatusPublic, "/status")

    def jobs(self, status: JobStatus | str | None = None, limit: int = 20, cursor: str | None = None) -> JobPage:
        value = status.value if isinstance(status, JobStatus) else status
        return self._get(JobPage, "/jobs", status=value, limit=limit, cursor=cursor)

    def job(self, job_id: str) -> JobPublic:
        return self._get(JobPublic, f"/jobs/{job_id}")

    def events(self, job_id: str, after: str | None = None, limit: int = 100) -> EventPage:
        return self._get(EventPage, f"/jobs/{job_id}/events", after=after, limit=limit)

    def artifacts(self, job_id: str) -> ArtifactsPublic:
        return self._get(ArtifactsPublic, f"/jobs/{job_id}/artifacts")

    def checkpoints(self, job_id: str) -> CheckpointPage:
        return self._get(CheckpointPage, f"/jobs/{job_id}/checkpoints")

    def cancel(self, job_id: str) -> CancelPublic:
        return CancelPublic.model_validate_json(self._check(self.http.post(f"/jobs/{job_id}/cancel")).content)

    def pause(self, job_id: str) -> JobPublic:
        """A running job saves its state and stops at the next step (`pausing`, then `paused`)."""
        return JobPublic.model_validate_json(self._check(self.http.post(f"/jobs/{job_id}/pause")).content)

    def resume(self, job_id: str) -> JobPublic:
        """A paused job waits for a free slot again, then continues where it stopped."""
        return JobPublic.model_validate_json(self._check(self.http.post(f"/jobs/{job_id}/resume")).content)

    def stream(self, job_id: str, after: str | None = None, *, reconnects: int = 5) -> Iterator[JobEvent]:
        """The job's events as they happen (Server-Sent Events); ends when the job has ended.

        A dropped connection is resumed from the last event seen, up to `reconnects` times in a row.
        """
        cursor, failures = after, 0
        while True:
            headers = {"Accept": "text/event-stream", **({"Last-Event-ID": cursor} if cursor else {})}
            try:
                with self.http.stream(
                    "GET", f"/jobs/{job_id}/events/stream", headers=headers, timeout=httpx.Timeout(30.0, read=None)
                ) as response:
                    if not response.is_success:
                        response.read()
                        self._check(response)
                    for etype, data in sse_blocks(response.iter_lines()):
                        failures = 0
                        if etype == "end":
                            return
                        event = JobEvent.model_validate_json(data)
                        cursor = event.id
                        yield event
            except (httpx.TransportError, httpx.RemoteProtocolError):
                failures += 1
                if failures > reconnects:
                    raise
                time.sleep(min(2.0 * failures, 10.0))
                continue
            # The server closed without an `end` event: resume unless the job is over.
            if self.job(job_id).status.terminal:
                return

    def download(self, job_id: str, dest: Path, *, checkpoint: int | None = None) -> list[Path]:
        """Fetch the adapter (or a checkpoint) as a tar.gz and unpack it safely into `dest`."""
        params = {"checkpoint": checkpoint} if checkpoint is not None else {}
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile() as spool:
            with self.http.stream(
                "GET", f"/jobs/{job_id}/artifacts/archive", params=params, timeout=httpx.Timeout(30.0, read=300.0)
            ) as response:
                if not response.is_success:
                    response.read()
                    self._check(response)
                for chunk in response.iter_bytes(1 << 20):
                    spool.write(chunk)
            spool.seek(0)
            return extract_tar_safely(cast(IO[bytes], spool), dest)

    # ---- the OpenAI-compatible chat surface ----
    def models(self) -> ModelList:
        """`GET /v1/models`: base models and fine-tuned (`ft:`) models a chat completion may name."""
        return self._get(ModelList, "/v1/models")

    def chat_stream(
        self,
        model: str,
        question: str | Sequence[Mapping[str, str]],
        *,
        system: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> Iterator[str]:
        """The answer's text as it is generated (`POST /v1/chat/completions` with `stream: true`).

        `model`: a job id, a `ft:` name or a base model. `question`: one user message, or the whole
        list of messages (then `system` must be None). Options left None take the server's defaults.
        ApiClientError when the request is refused; client.chat.ChatStreamError when the stream
        reports a failure after it began.
        """
        if isinstance(question, str):
            messages: list[dict[str, str]] = chat_messages(question, system)
        elif system is not None:
            raise ValueError("pass the system prompt inside the messages when giving a list of messages")
        else:
            messages = [dict(m) for m in question]
        body: dict[str, Any] = {"model": model, "messages": messages, "stream": True}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if temperature is not None:
            body["temperature"] = temperature
        # A long read limit: the first token may wait for a busy generation worker (the server's own
        # time limit, LORA_GENERATION_TIMEOUT_S, ends the request well before this one).
        timeout = httpx.Timeout(30.0, read=600.0)
        headers = {"Accept": "text/event-stream"}
        with self.http.stream("POST", "/v1/chat/completions", json=body, headers=headers, timeout=timeout) as response:
            if not response.is_success:
                response.read()
                self._check(response)
            yield from chunk_texts(sse_blocks(response.iter_lines()))
