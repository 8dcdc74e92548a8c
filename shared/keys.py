"""Every Redis key name the service uses."""

PREFIX = "lora:"
ACTIVE = PREFIX + "active"  # zset: job id -> lease (or queue) deadline, ms since epoch; one member per slot
JOBS = PREFIX + "jobs"  # zset: job id -> creation time, ms; the history, newest last
WORKERS = PREFIX + "workers"  # zset: worker name -> last heartbeat, ms
JOB_PREFIX = PREFIX + "job:"  # hash per job: JOB_PREFIX + id
EVENTS_SUFFIX = ":events"  # stream per job: JOB_PREFIX + id + EVENTS_SUFFIX


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


# Waiting for a slot, and what is due to be told about jobs.
WAITING = PREFIX + "waiting"  # zset: job id -> arrival time, ms; jobs queued beyond the slots, FIFO
WEBHOOK_OUTBOX = PREFIX + "webhooks:outbox"  # list: JSON {event_id, job_id, status, created_at} per ended job
# The API's dispatcher fans each outbox entry out to one pending delivery per receiver URL (shared.webhook_queue).
WEBHOOK_PENDING = PREFIX + "webhooks:pending"  # zset: delivery JSON -> next attempt (or claim expiry), ms
