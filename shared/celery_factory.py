"""The Celery app factory: the one configuration the worker builds its app from (to consume) and the API
builds its own from (only to send tasks by name)."""

from __future__ import annotations

from celery import Celery

from shared.settings import Settings
from shared.tasks import QUEUE

RECYCLE_THRESHOLD_KB = 2**40  # a child "above" it is replaced after its task: see worker.jobs.recycle


def make_celery(settings: Settings, *, include: list[str] | None = None) -> Celery:
    app = Celery("lora_server", broker=settings.redis_url, include=include or [])
    visibility = settings.effective_visibility_timeout_s
    app.conf.update(
        # A GPU job takes hours: acknowledge only when it is done, so a lost worker's job is redelivered ...
        task_acks_late=True,
        # ... also when the child process is killed (OOM, SIGKILL); the job store's fencing refuses duplicates.
        task_reject_on_worker_lost=True,
        # Never hold a second job in reserve behind the running one: another GPU worker should take it.
        worker_prefetch_multiplier=1,
        # One job per GPU per worker process.
        worker_concurrency=1,
        # With keep_base_model a child runs job after job with the base model kept loaded; it is replaced
        # only when a job leaves more memory held than the base (worker.jobs.recycle). Without it, a fresh
        # child per job releases all GPU memory when the job ends.
        worker_max_tasks_per_child=None if settings.keep_base_model else 1,
        # billiard checks a child's memory after each task only when this is set: the child reports itself
        # past it when it asks to be replaced (worker.jobs.recycle). The real bound is relative to the
        # resident base (LORA_MAX_RSS_GROWTH_MB), which a fixed figure here could not know.
        worker_max_memory_per_child=RECYCLE_THRESHOLD_KB if settings.keep_base_model else None,
        # The broker redelivers unacked messages after the visibility timeout: keep it above the job limit.
        task_time_limit=settings.job_time_limit_s,
        broker_transport_options={
            "visibility_timeout": visibility,
            # Sweep for expired unacked messages at a pace that fits the timeout (kombu's default is ~100 s).
            "unacked_restore_interval": max(1, min(10, visibility // 10)),
            "unacked_restore_throttle": 1 if visibility < 3600 else 10,
            "socket_timeout": 10,
            "socket_connect_timeout": 5,
        },
        result_backend_transport_options={"visibility_timeout": visibility},
        # Not Celery's way of stopping a job cut off from the broker: it kills the task on every
        # reconnect, so a two-second Redis restart would throw away hours of GPU work. The job's lease
        # thread stops training itself once Redis has been gone for half a lease, and the lease's
        # fencing refuses the message Celery redelivers after reconnecting.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        # JSON only: pickled payloads would let anyone who can write to Redis run code on workers.
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        # The job record in Redis is the source of truth; Celery's results would only duplicate it.
        task_ignore_result=True,
        task_default_queue=QUEUE,
        # Flower's view of tasks.
        worker_send_task_events=True,
        task_send_sent_event=True,
        # Publishing must fail fast so the API can answer 503 instead of hanging on a dead broker.
        broker_connection_timeout=3,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1},
        worker_hijack_root_logger=False,
    )
    return app
