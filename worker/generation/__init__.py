"""The generation worker process: keeps models loaded and answers chat completions from the generation queue
(`python -m worker.generation`)."""
