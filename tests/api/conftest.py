"""The fast tier: the ASGI app in this process (Starlette's TestClient, which runs its lifespan) over the
real Redis-compatible server; no worker process and no subprocess, but a training worker's announcement (the
slots admission counts: tests/fixtures/worker_announcement.py). Admitted jobs stay queued, their tasks in the
broker's queue. The hub ids these tests train on (the seed's default, `some/model`) are in a Hugging Face
cache of the test's own, as on a host that downloaded them; the hub itself stays offline."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from api.main import create_app
from shared.settings import Settings
from shared.store import JobStore
from tests.fixtures.hub_cache import add_cached_model
from tests.fixtures.worker_announcement import announced_worker

CACHED_MODELS = ("Qwen/Qwen2.5-0.5B", "some/model")


@pytest.fixture(autouse=True)
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hf-hub-cache"
    for repo_id in CACHED_MODELS:
        add_cached_model(cache, repo_id)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def settings(tmp_path: Path, redis_client: redis.Redis, redis_url: str) -> Settings:
    """Small limits, so that refusing an upload over them takes no time; the Redis database is flushed."""
    return Settings(
        base_path=tmp_path / "base",
        redis_url=redis_url,
        max_upload_mb=1,
        max_record_kb=64,
        max_records=1000,
        min_free_disk_mb=1,
    )


@pytest.fixture
def api(settings: Settings, redis_client: redis.Redis) -> Iterator[TestClient]:
    """The app, with one training worker's announcement in Redis (the slots admission counts: as many as the
    test's settings cap, else one); its jobs stay queued, since no worker process takes them."""
    slots = settings.max_concurrent_jobs or 1
    with announced_worker(redis_client, settings, slots=slots), TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture
def store(redis_client: redis.Redis) -> JobStore:
    return JobStore(redis_client)
