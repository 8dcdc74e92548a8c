"""The contract between the processes: what at least two of the API, the workers, the HTTP client and the CLI
read (settings, the training config, the job record and store, Redis keys, the task, the volume layout, the
stored dataset format, the generation protocol, the public response models). No torch, no FastAPI."""
