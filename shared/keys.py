"""Every Redis key name the service uses."""

PREFIX = "lora:"
ACTIVE = PREFIX + "active"  # zset: job id -> lease (or queue) deadline, ms since epoch; one member per slot
JOBS = PREFIX + "jobs"  # zset: job id -> creation time, ms; the history, newest last
WORKERS = PREFIX + "workers"  # zset: worker name -> last heartbeat, ms
JOB_PREFIX = PREFIX + "job:"  # hash per job: JOB_PREFIX + id
EVENTS_SUFFIX = ":events"  # stream per job: JOB_PREFIX + id + EVENTS_SUFFIX


WORKER_PREFIX = PREFIX + "worker:"  # string per training worker: what it announced (shared.workers), expiring


def worker_info_key(name: str) -> str:
    return WORKER_PREFIX + name


def job_key(job_id: str) -> str:
    return JOB_PREFIX + job_id


def events_key(job_id: str) -> str:
    return JOB_PREFIX + job_id + EVENTS_SUFFIX


# The OpenAI-compatible surface (/v1): uploaded files, and the OpenAI-only fields of a job.
FILES = PREFIX + "files"  # zset: file id -> upload time, ms; the index of uploaded files
FILE_PREFIX = PREFIX + "file:"  # hash per uploaded file: FILE_PREFIX + id
OPENAI_SUFFIX = ":openai"  # hash per job created through /v1: JOB_PREFIX + id + OPENAI_SUFFIX


def file_key(file_id: str) -> str:
    return FILE_PREFIX + file_id


def openai_job_key(job_id: str) -> str:
    return JOB_PREFIX + job_id + OPENAI_SUFFIX


# zset: base model name -> first use (ms) by a training job that loaded it (the older "base_models", noted at
# submission, also held names no worker ever loaded: it is left unread)
BASE_MODELS = PREFIX + "loaded_base_models"
# Waiting for a slot, and what is due to be told about jobs.
WAITING = PREFIX + "waiting"  # zset: job id -> arrival time, ms; jobs queued beyond the slots, FIFO
WEBHOOK_OUTBOX = PREFIX + "webhooks:outbox"  # list: JSON {event_id, job_id, status, created_at} per ended job
# The API's dispatcher fans each outbox entry out to one pending delivery per receiver URL (api.webhooks.queue).
WEBHOOK_PENDING = PREFIX + "webhooks:pending"  # zset: delivery JSON -> next attempt (or claim expiry), ms


# Chat completions: requests wait in one list that every generation worker pops from; each request's
# tokens come back on a stream of its own (expiring), and the API stops a request through a flag.
GENERATE_QUEUE = PREFIX + "generate:queue"  # list: JSON GenerationRequest per pending request, oldest first
GENERATORS = PREFIX + "generators"  # zset: generation worker name -> last heartbeat, ms
GENERATION_PREFIX = PREFIX + "generate:"


def generation_output_key(request_id: str) -> str:
    """Stream of one request's output events (shared.generation.GenerationEvent), written by the worker."""
    return GENERATION_PREFIX + request_id + ":out"


def generation_cancel_key(request_id: str) -> str:
    """Set (with an expiry) when the API no longer wants a request's output: the worker stops generating."""
    return GENERATION_PREFIX + request_id + ":cancel"


# The Tinker-compatible API (api.tinker, worker.tinker): sessions, each training model's calls, and futures.
TINKER_PREFIX = PREFIX + "tinker:"
TINKER_SESSIONS = TINKER_PREFIX + "sessions"  # zset: session id -> last heartbeat, ms


def tinker_session_key(session_id: str) -> str:
    """Hash per client session: its tags, creation time, and whether it ended."""
    return TINKER_PREFIX + "session:" + session_id


def tinker_model_key(model_id: str) -> str:
    """Hash per training model: its base, rank, session, the job hosting it, its last call (shared.tinker_store)."""
    return TINKER_PREFIX + "model:" + model_id


def tinker_calls_key(model_id: str) -> str:
    """List of a training model's queued calls (shared.tinker_ops.TinkerCall JSON), for the worker hosting it."""
    return TINKER_PREFIX + "model:" + model_id + ":calls"


def tinker_seq_key(model_id: str) -> str:
    """The next seq_id a training model's host runs (the ones before it have run), across hostings."""
    return TINKER_PREFIX + "model:" + model_id + ":seq"


def tinker_checkpoints_key(model_id: str) -> str:
    """Hash of a training model's checkpoints: tinker path -> shared.tinker_store.CheckpointInfo JSON."""
    return TINKER_PREFIX + "model:" + model_id + ":checkpoints"


def tinker_settled_key(request_id: str) -> str:
    """List a future's settler pushes to once it is settled: what a waiting retrieve_future blocks on."""
    return TINKER_PREFIX + "future:" + request_id + ":settled"


def tinker_future_key(request_id: str) -> str:
    """Hash per accepted call: pending until the worker (or the API, for a model that is gone) settles it."""
    return TINKER_PREFIX + "future:" + request_id


def tinker_sampler_key(sampling_session_id: str) -> str:
    """A sampling session (shared.tinker_store.SamplingSession JSON)."""
    return TINKER_PREFIX + "sampler:" + sampling_session_id


# Sampling requests (shared.tinker_ops.SampleOp JSON) wait here; every generation worker pops from it as
# from GENERATE_QUEUE, and settles the request's future (shared.tinker_store).
TINKER_SAMPLE_QUEUE = TINKER_PREFIX + "sample:queue"


# Hosting jobs that take more clients on their base (shared.tinker_store.HostInfo), and each one's attach list.
TINKER_HOSTS = TINKER_PREFIX + "hosts"  # hash: hosting job id -> HostInfo JSON, while the job runs


def tinker_host_attach_key(job_id: str) -> str:
    """List of model ids the API sent to a running hosting job to join it (its base is theirs, it has room)."""
    return TINKER_PREFIX + "host:" + job_id + ":attach"


TINKER_MODELS = TINKER_PREFIX + "models"  # zset: every training model id -> its creation time, ms


def tinker_session_models_key(session_id: str) -> str:
    """Set of the training model ids a session created."""
    return TINKER_PREFIX + "session:" + session_id + ":models"


def tinker_session_samplers_key(session_id: str) -> str:
    """Set of the sampling session ids a session opened."""
    return TINKER_PREFIX + "session:" + session_id + ":samplers"


def tinker_requests_key(model_id: str) -> str:
    """Hash of a training model's accepted calls: seq_id -> request id (a re-sent call gets the same future)."""
    return TINKER_PREFIX + "model:" + model_id + ":requests"


def tinker_host_lock_key(model_id: str) -> str:
    """Held (SET NX, with an expiry) while one API request starts a hosting job for a model: never two hosts."""
    return TINKER_PREFIX + "model:" + model_id + ":hosting"
