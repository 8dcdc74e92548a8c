"""The layout of the shared volume (`LORA_BASE_PATH`): every path the service writes, named once.

    <base>/datasets/<name>.jsonl                 validated datasets: `<job id>`, `<job id>.validation`, `<file id>`
    <base>/datasets/.incoming/                   uploads being received and validated (never a final name);
                                                 what a killed API left there is swept by age (api.incoming)
    <base>/checkpoints/<job id>/step-000120/     adapter checkpoints; `checkpoint.json` is written last
    <base>/checkpoints/<job id>/.step-000120.*.tmp   a checkpoint being written (hidden: not listed)
    <base>/checkpoints/<job id>/step_metrics.csv     the job's logged steps (its OpenAI result file)
    <base>/<model_save_path or job id>/          a trained adapter, with `training_summary.json`
    <base>/<adapter name>-merged/                a merged model (the default output of a merge job)
    <base>/tinker/<model id>/weights/<name>/     a Tinker training model's checkpoints (and sampler_weights/<name>)
    <base>/.redis/                               the embedded Redis's data (one-machine mode)
    <base>/.cache/torch-compile/                 torch.compile's on-disk caches (inductor, Triton), shared by hosts

Names starting with "." are the service's own staging and data folders; `datasets`, `checkpoints` and
`tinker` are reserved too, so a user's output folder can never replace one of them.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.job_ids import is_job_id

DATASETS = "datasets"
INCOMING = ".incoming"
CHECKPOINTS = "checkpoints"
REDIS_DATA = ".redis"
COMPILE_CACHE = ".cache/torch-compile"
TRAINING_STATE = ".state"  # a job's full training state (pause/resume, resume after a lost worker)
CHECKPOINT_META = "checkpoint.json"
TRAINING_SUMMARY = "training_summary.json"
ADAPTER_CONFIG = "adapter_config.json"
STEP_METRICS = "step_metrics.csv"
MERGED_SUFFIX = "-merged"
TINKER = "tinker"  # Tinker training models' checkpoints: tinker/<model id, ':' as '-'>/{weights,sampler_weights}/<name>

# Top-level folders the service writes itself; an adapter saved over one would replace (and delete) it.
RESERVED_DIRS = frozenset({DATASETS, CHECKPOINTS, TINKER})
RESERVED_HELP = "datasets/, checkpoints/, tinker/ and names starting with '.', such as the embedded Redis's .redis/"

_CHECKPOINT_NAME = re.compile(r"^step-(\d{1,12})$")


class CheckpointMeta(BaseModel):
    """The content of a checkpoint's `checkpoint.json` (the worker writes it last, so its presence
    means the checkpoint is complete)."""

    model_config = ConfigDict(extra="ignore")

    step: int = Field(ge=0, description="optimizer steps done when it was taken")
    epoch: int = Field(ge=0, description="epochs done when it was taken")
    train_loss: float | None = Field(default=None, description="the epoch's mean training loss")
    train_mean_token_accuracy: float | None = Field(
        default=None, description="the epoch's mean training token accuracy (None where the engine computed none)"
    )
    valid_loss: float | None = Field(
        default=None, description="loss on the last logged step's validation batch (None without validation data)"
    )
    valid_mean_token_accuracy: float | None = Field(default=None, description="token accuracy on that batch")
    full_valid_loss: float | None = Field(default=None, description="loss on the whole validation set")
    full_valid_mean_token_accuracy: float | None = Field(
        default=None, description="token accuracy on the whole validation set"
    )
    created_at: float = Field(description="seconds since the epoch")

    @model_validator(mode="before")
    @classmethod
    def _legacy_names(cls, value: Any) -> Any:
        # checkpoint.json written before the OpenAI names: `loss` (the epoch's mean training loss)
        # and `eval_loss` (over the whole validation set) are read as the fields they were.
        if isinstance(value, dict) and ("loss" in value or "eval_loss" in value):
            value = dict(value)
            value.setdefault("train_loss", value.pop("loss", None))
            value.setdefault("full_valid_loss", value.pop("eval_loss", None))
        return value

    @property
    def loss(self) -> float | None:
        """The native API's name for `train_loss`."""
        return self.train_loss

    @property
    def eval_loss(self) -> float | None:
        """The native API's name for `full_valid_loss`."""
        return self.full_valid_loss


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint taken after `step`: `step-000120`."""
    return f"step-{step:06d}"


def checkpoint_step(name: str) -> int | None:
    """The step a checkpoint folder name stands for; None for any other name (staging folders included)."""
    match = _CHECKPOINT_NAME.match(name)
    return int(match.group(1)) if match else None


def checkpoint_staging_name(step: int) -> str:
    """A hidden sibling to write a checkpoint into before it is renamed into place."""
    return f".{checkpoint_name(step)}.{uuid.uuid4().hex[:8]}.tmp"


def merged_name(adapter_path: str) -> str:
    """The default output folder of a merge: the adapter's folder name plus `-merged`."""
    return adapter_path.rstrip("/").rsplit("/", 1)[-1] + MERGED_SUFFIX


class Volume:
    """Paths under one base folder. Building a path creates nothing."""

    def __init__(self, base: Path) -> None:
        self.base = base

    @property
    def datasets(self) -> Path:
        return self.base / DATASETS

    @property
    def incoming(self) -> Path:
        return self.datasets / INCOMING

    def dataset(self, name: str) -> Path:
        """A validated dataset: `name` is a job id, `<job id>.validation` or a file id."""
        return self.datasets / f"{name}.jsonl"

    def job_datasets(self, job_id: str) -> tuple[Path, Path]:
        """A job's training dataset and its (optional) validation dataset."""
        return self.dataset(job_id), self.dataset(f"{job_id}.validation")

    def staging(self, name: str) -> Path:
        """Where the validated copy of dataset `name` is written before it is renamed into place."""
        return self.incoming / f"{name}.jsonl.part"

    def new_upload(self) -> Path:
        """A fresh name for an upload being received: our own, never the client's filename."""
        return self.incoming / f"{uuid.uuid4().hex}.upload"

    @property
    def checkpoints(self) -> Path:
        return self.base / CHECKPOINTS

    def localize(self, path: str, origin: str | None) -> Path:
        """`path`, named under the base path `origin` (another host's), as it lies under this base path; a path
        outside `origin` (a models folder, a hub cache) is the same everywhere."""
        if origin is None:
            return Path(path)
        try:
            rel = Path(path).relative_to(origin)
        except ValueError:
            return Path(path)
        return self.base.resolve() / rel

    def job_state(self, job_id: str) -> Path:
        """The folder of a job's saved training state (it may not exist)."""
        if not is_job_id(job_id):
            raise ValueError(f"{job_id!r} is not a job id")
        return self.base / TRAINING_STATE / job_id

    def saved_states(self) -> list[tuple[str, Path]]:
        """(job id, folder) of every job that has a saved training state here."""
        try:
            entries = list((self.base / TRAINING_STATE).iterdir())
        except OSError:
            return []
        return [(entry.name, entry) for entry in entries if is_job_id(entry.name) and entry.is_dir()]

    def job_checkpoints(self, job_id: str) -> Path:
        """The folder of a job's checkpoints (it may not exist yet)."""
        if not is_job_id(job_id):
            raise ValueError(f"{job_id!r} is not a job id")
        return self.checkpoints / job_id

    def checkpoint(self, job_id: str, step: int) -> Path:
        return self.job_checkpoints(job_id) / checkpoint_name(step)

    def step_metrics(self, job_id: str) -> Path:
        """A job's logged-steps CSV (`worker.training.results_log`), beside its checkpoints and removed with them."""
        return self.job_checkpoints(job_id) / STEP_METRICS

    def default_output(self, job_id: str) -> str:
        """A job's adapter folder, relative to the base, when the config names none."""
        return job_id

    def tinker_model(self, model_id: str) -> Path:
        """A Tinker training model's folder (its hosting job's output_dir): its checkpoints go under it."""
        return self.base / TINKER / model_id.replace(":", "-")

    @property
    def redis_data(self) -> Path:
        return self.base / REDIS_DATA

    @property
    def compile_cache(self) -> Path:
        """torch.compile's on-disk caches: on the volume, so a graph compiled on one host is reused on every other."""
        return self.base / COMPILE_CACHE

    def reserved_part(self, path: Path) -> str | None:
        """The part of `path` (resolved, inside the base) that is the service's own, if any."""
        parts = path.relative_to(self.base.resolve()).parts
        if parts and parts[0] in RESERVED_DIRS:
            return parts[0]
        # Hidden names: the embedded Redis's data folder and every staging folder.
        return next((part for part in parts if part.startswith(".")), None)
