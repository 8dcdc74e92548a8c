"""What the OpenAI surface keeps in Redis beside our own records (api.openai.store reads and writes them)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from api.openai.schemas import HyperparametersPublic
from shared.files import FileRecord

__all__ = ["FileRecord", "OpenAIJobRecord"]  # FileRecord lives in shared.files: the worker registers result files


class OpenAIJobRecord(BaseModel):
    """What a job created through /v1 adds to our JobRecord, as the client sent it (one hash per job)."""

    model_config = ConfigDict(extra="ignore")

    model: str  # as the client named it
    training_file: str
    validation_file: str | None = None
    suffix: str | None = None
    metadata: dict[str, str] | None = None
    hyperparameters: HyperparametersPublic
