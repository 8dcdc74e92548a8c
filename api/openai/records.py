"""What the OpenAI surface keeps in Redis beside our own records (api.openai.store reads and writes them)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from api.openai.schemas import HyperparametersPublic


class FileRecord(BaseModel):
    """An uploaded training file (one hash per file)."""

    model_config = ConfigDict(extra="ignore")

    id: str
    bytes: int
    created_at: int
    filename: str  # the client's name, for display only; never used as a path
    purpose: Literal["fine-tune"]
    path: str  # the normalised JSON Lines file on the volume
    num_records: int


class OpenAIJobRecord(BaseModel):
    """What a job created through /v1 adds to our JobRecord, as the client sent it (one hash per job)."""

    model_config = ConfigDict(extra="ignore")

    model: str  # as the client named it
    training_file: str
    validation_file: str | None = None
    suffix: str | None = None
    metadata: dict[str, str] | None = None
    hyperparameters: HyperparametersPublic
