"""The Celery worker process: takes a job off the queue, holds its lease, runs it on the training engine and
records the outcome (`celery -A worker.jobs.celery_app worker`)."""
