"""The GPU side, one package per process: `jobs` (the Celery worker that takes training and merge jobs),
`training` (the engine those jobs run, also a library: no Redis, no Celery) and `generation` (the
long-lived process that answers chat completions)."""
