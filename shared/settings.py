"""Process settings, read from `LORA_*` environment variables.

Built lazily through `get_settings()` so that importing any module needs no environment.
"""

from __future__ import annotations

import base64
import binascii
import json
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.volume import Volume

if TYPE_CHECKING:
    from shared.object_store import ObjectStore


class Settings(BaseSettings):
    # hide_input_in_errors: a refused setting may be a secret (LORA_WEBHOOK_SECRET, LORA_API_KEY); the
    # messages name the variable instead of echoing its value into logs.
    model_config = SettingsConfigDict(env_prefix="LORA_", extra="ignore", hide_input_in_errors=True)

    base_path: Path = Field(default=Path("./models"), description="Volume for datasets and adapters.")
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", description="Broker and job store.")
    max_concurrent_jobs: int | None = Field(
        default=None,
        ge=1,
        description="A cap on training slots; unset, the slots are those the live workers announce (one per GPU).",
    )
    storage_url: str | None = Field(
        default=None,
        description="s3://bucket/prefix: keep datasets, adapters, checkpoints and saved states in object storage "
        "(the AWS_* settings name the endpoint and credentials); unset, the local base_path is the store.",
    )
    storage_presign_s: int = Field(
        default=0, ge=0, le=7 * 24 * 3600, description="With object storage: downloads of single files (a file's "
        "content, an adapter's files) answer with a URL to the store signed for this many seconds; 0: streamed "
        "through the API."
    )  # fmt: skip
    storage_cache_gb: float = Field(
        default=50.0, ge=0, description="With object storage: the most a host keeps of staged copies (base models, "
        "adapters), least recently used evicted first."
    )  # fmt: skip
    max_upload_mb: float = Field(default=1024.0, gt=0, description="Largest accepted dataset upload.")
    max_record_kb: int = Field(default=8192, ge=1, description="Largest single dataset record.")
    max_records: int = Field(default=2_000_000, ge=1, description="Most records in one dataset.")
    max_config_kb: int = Field(default=64, ge=1, description="Largest accepted config part.")
    upload_idle_timeout_s: float = Field(default=60.0, gt=0, description="Abandon an upload idle this long.")
    min_free_disk_mb: int = Field(default=256, ge=0, description="Refuse uploads below this free space.")
    incoming_max_age_s: float = Field(
        default=600.0,
        gt=0,
        description="Remove a staged upload (datasets/.incoming) left untouched this long, such as the partial file "
        "of an API killed mid-upload; never less than twice upload_idle_timeout_s, so a live upload is never taken.",
    )
    incoming_sweep_interval_s: float = Field(
        default=60.0, gt=0, description="How often the API sweeps datasets/.incoming (it also sweeps at start)."
    )
    lease_ttl_s: float = Field(default=60.0, gt=0, description="Worker lease on a running job.")
    queue_timeout_s: float = Field(
        default=3600.0,
        gt=0,
        description="Fail a queued job no worker picked up within this time.",
    )
    max_queued_jobs: int = Field(
        default=100,
        ge=0,
        description="Jobs that may wait for a free slot (the OpenAI API, and /train with queue=true); past it, 429.",
    )
    state_every_s: float = Field(
        default=600.0,
        ge=0,
        description="Save a training job's full state every this many seconds (and at epoch ends, on a "
        "pause and when its worker is asked to stop), so a job whose worker died continues from there; "
        "written in the background. 0 = off. The state is kept only while its job can still continue from it "
        "(running, queued again or paused) and deleted once the job has ended.",
    )
    state_every_steps: int = Field(
        default=0,
        ge=0,
        description="Also save it every this many steps (exact steps: for tests); 0 = off.",
    )
    reap_interval_s: float = Field(default=5.0, gt=0, description="How often lapsed leases are reaped.")
    merge_wait_s: float = Field(
        default=600.0, gt=0, description="How long the seed's POST /merge waits for its merge before answering 202."
    )
    max_attempts: int = Field(
        default=3,
        ge=1,
        description="Runs allowed per job: a job whose worker died without warning (a kill, a lost host) runs "
        "again from its last saved state until this many runs were lost. A worker that is asked to stop "
        "hands its job back without using a run.",
    )
    job_time_limit_s: int = Field(default=7 * 24 * 3600, ge=1, description="Hard limit on one job.")
    visibility_timeout_s: int | None = Field(
        default=None,
        description="Broker redelivery timeout; defaults to the job time limit plus an hour.",
    )
    job_retention_days: float = Field(
        default=90.0, gt=0, description="Records and events of ended jobs are deleted after this many days."
    )
    api_key: str | None = Field(default=None, description="Bearer token required by the API when set.")
    cors_origins: list[str] = Field(default_factory=list, description="Allowed CORS origins (closed by default).")
    worker_name: str | None = Field(default=None, description="Name a worker reports (defaults to host:pid).")
    # NoDecode: `_split_list` takes a JSON list or commas (pydantic-settings alone would take JSON only).
    models_dir: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Folders besides base_path whose model folders may be trained on (by their path, or their name "
        "relative to the folder): one path, comma-separated paths or a JSON list.",
    )
    allowed_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="When set, the only base models jobs may use: fnmatch patterns (`Qwen/*`, `bases/*`) matched "
        "against model_name as given; comma-separated or a JSON list. Empty: any model that exists.",
    )
    hub_timeout_s: float = Field(
        default=5.0,
        gt=0,
        description="How long a submission waits for the Hugging Face hub to confirm a hub id that is not in the "
        "local cache (never asked with HF_HUB_OFFLINE=1).",
    )
    keep_base_model: bool = Field(
        default=True,
        description="Keep the base model loaded in the worker's child between jobs of the same model (one "
        "child runs job after job); false: a fresh child per job, which loads the base every time.",
    )
    max_rss_growth_mb: float = Field(
        default=2048.0,
        gt=0,
        description="With keep_base_model: replace the worker's child once its host memory has grown this much "
        "since the first job on its resident base (a leak).",
    )
    torch_threads: int = Field(
        default=0,
        ge=0,
        description="torch's CPU threads in a training or generation worker. 0 = sized from the cores the "
        "process may use (affinity, cgroup quota), less one for the API where it shares the host "
        "(worker.cpu_budget); an OMP_NUM_THREADS already set is kept then.",
    )
    api_on_host: bool = Field(
        default=False,
        description="The API and Redis run on this worker's host (the one-command launcher sets it): torch "
        "leaves them a core.",
    )
    workers_on_host: int = Field(
        default=1, ge=1, description="Training workers sharing this host's cores (the one-command launcher sets it)."
    )
    generation_max_pending: int = Field(
        default=32,
        ge=1,
        description="Chat completion requests that may wait for a generation worker; past it, 429.",
    )
    generation_max_tokens: int = Field(
        default=2048,
        ge=1,
        description="Most tokens one chat completion may generate (the default when a request names none); "
        "a larger max_tokens is a 400.",
    )
    generation_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="Time limit on one chat completion, waiting included: past it the API answers 504 and "
        "the generation worker stops.",
    )
    generation_max_adapters: int = Field(
        default=8, ge=1, description="Adapters a generation worker keeps loaded on each base model (LRU)."
    )
    generation_max_base_models: int = Field(
        default=1, ge=1, description="Base models a generation worker keeps loaded (LRU), each with its adapters."
    )
    generation_device: str = Field(
        default="auto",
        description="Where a generation worker runs its models: 'auto' (the worker's GPU, else the CPU), "
        "'cpu', or a torch device such as 'cuda:1'.",
    )
    tinker_max_request_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1024,
        description="Largest request body the Tinker-compatible API (/api/v1) reads; a forward_backward over it is a 400.",
    )
    tinker_max_call_tokens: int = Field(
        default=1_048_576,
        ge=1,
        description="Most input tokens one Tinker forward / forward_backward call may carry (all its data together).",
    )
    tinker_poll_s: float = Field(
        default=25.0,
        gt=0,
        le=40,
        description="How long one Tinker retrieve_future waits for its result before answering try_again (the SDK "
        "waits 45 s for an answer).",
    )
    tinker_sample_max_pending: int = Field(
        default=256,
        ge=1,
        description="Tinker sampling requests that may wait for a generation worker; past it, 429.",
    )
    # NoDecode: pydantic-settings would parse the variable as JSON only; `_split_list` takes a JSON list or commas.
    webhook_url: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Receivers of the fine_tuning.job.* webhooks: one URL, comma-separated URLs or a JSON list.",
    )
    webhook_secret: SecretStr | None = Field(
        default=None,
        description="Standard Webhooks signing secret, `whsec_<base64>`; required when webhook_url is set.",
    )
    webhook_timeout_s: float = Field(default=10.0, gt=0, description="How long one webhook delivery may take.")
    webhook_max_attempts: int = Field(
        default=8, ge=1, description="Deliveries tried per event and URL before the event is dropped for that URL."
    )
    webhook_retry_base_s: float = Field(
        default=30.0,
        gt=0,
        description="First retry delay; it doubles each attempt, with jitter (8 attempts span about an hour).",
    )
    webhook_poll_interval_s: float = Field(
        default=1.0, gt=0, description="How often the API looks for new events and retries due."
    )
    tinker_idle_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="A Tinker training client's model idle this long (no call) is saved and its slot and memory "
        "freed; its next call loads it again on a free slot.",
    )
    tinker_clients_per_worker: int = Field(
        default=4,
        ge=1,
        description="Tinker training clients one hosting job (one slot, one loaded base) takes on the same base "
        "model, each with its own adapter and optimizer; a client past this takes a slot of its own.",
    )

    @field_validator("storage_url", mode="before")
    @classmethod
    def _storage_url(cls, value: object) -> object:
        if value in ("", None):
            return None
        from shared.object_store import StorageUrl

        StorageUrl.parse(str(value))  # ValueError names the expected form
        return value

    @field_validator("webhook_url", "models_dir", "allowed_models", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]

    @field_validator("webhook_url")
    @classmethod
    def _check_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"LORA_WEBHOOK_URL: {url!r} is not an http(s) URL")
        return list(dict.fromkeys(urls))  # one delivery per receiver, however often it is named

    @field_validator("webhook_secret")
    @classmethod
    def _check_secret(cls, secret: SecretStr | None) -> SecretStr | None:
        if secret is not None:
            webhook_key(secret.get_secret_value())
        return secret

    @model_validator(mode="after")
    def _signed_or_nothing(self) -> Settings:
        # OpenAI always signs its webhooks and receivers verify them: an unsigned one would be rejected anyway.
        if self.webhook_url and self.webhook_secret is None:
            raise ValueError("LORA_WEBHOOK_URL is set but LORA_WEBHOOK_SECRET is not: " + _SECRET_HELP)
        return self

    @property
    def effective_visibility_timeout_s(self) -> int:
        if self.visibility_timeout_s is not None:
            return self.visibility_timeout_s
        return self.job_time_limit_s + 3600

    @property
    def effective_incoming_max_age_s(self) -> float:
        """incoming_max_age_s, raised to twice upload_idle_timeout_s: a receiver still waiting for data is live."""
        return max(self.incoming_max_age_s, 2 * self.upload_idle_timeout_s)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def volume(self) -> Volume:
        """The layout of everything the service writes under base_path."""
        return Volume(self.base_path)

    @property
    def store(self) -> ObjectStore | None:
        """The object store behind base_path (LORA_STORAGE_URL), or None when base_path is the store."""
        from shared.object_store import object_store

        return object_store(self.storage_url, self.base_path)


_SECRET_HELP = (
    "webhooks are signed with a Standard Webhooks secret, 'whsec_' + base64 of 24 or more random bytes, e.g. "
    "python -c \"import base64, os; print('whsec_' + base64.b64encode(os.urandom(32)).decode())\""
)


def webhook_key(secret: str) -> bytes:
    """The signing key a `whsec_<base64>` secret holds, or ValueError.

    Strict: the official openai client decodes the part after `whsec_` as padded base64 (and uses any other
    string as raw bytes), the standardwebhooks library pads it and skips bad characters; only a prefixed,
    well-formed secret means the same key to both.
    """
    if not secret.startswith("whsec_"):
        raise ValueError("LORA_WEBHOOK_SECRET must start with 'whsec_': " + _SECRET_HELP)
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("LORA_WEBHOOK_SECRET is not valid base64 after 'whsec_': " + _SECRET_HELP) from None
    if len(key) < 24:
        raise ValueError(f"LORA_WEBHOOK_SECRET holds {len(key)} bytes; use 24 or more: " + _SECRET_HELP)
    return key


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
