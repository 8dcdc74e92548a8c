"""One-machine mode: an embedded Redis-compatible server (unless one is named), the Celery worker(s) and
the API as child processes, stopped together."""
