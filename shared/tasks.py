"""Celery task names: the API sends by name and never imports worker code."""

TRAIN_TASK = "lora.train"
QUEUE = "lora"
