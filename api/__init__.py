"""The HTTP API process (FastAPI): validates and stores what users send, admits jobs to slots and publishes
their tasks, and reads job state back from Redis; it never loads torch (`api.main.create_app`)."""
