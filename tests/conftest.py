"""Shared fixtures: a real Redis-compatible server, the tiny model, and the running service.

Redis: `LORA_TEST_REDIS_URL` names a server to use (its database is flushed between tests);
otherwise an embedded one is started for the session, so the suite runs on a bare machine.

Base models: for the whole session the hub is off (HF_HUB_OFFLINE=1), the Hugging Face cache is an empty
folder of the session's own (HF_HUB_CACHE: a developer's warm cache changes no result), and the tiny model is
built in a models directory every service of the session allows (LORA_MODELS_DIR). Processes the tests start
inherit all three.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from launcher.embedded_redis import EmbeddedRedis
from tests.fixtures.s3_server import S3Server
from tests.service import Service, flush


@pytest.fixture(scope="session", autouse=True)
def model_sources(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The session's models directory (LORA_MODELS_DIR), with an empty hub cache and the hub offline."""
    models = tmp_path_factory.mktemp("models")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LORA_MODELS_DIR", str(models))
        env.setenv("HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf-hub-cache")))
        env.setenv("HF_HUB_OFFLINE", "1")
        yield models


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("LORA_TEST_REDIS_URL")
    if url:
        yield url
        return
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), persist=False).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="session")
def tiny_model_dir(model_sources: Path) -> Path:
    """A tiny random Qwen2 chat model and ChatML tokenizer, built locally once per session, in the models
    directory (so services accept it by its absolute path)."""
    from tests.fixtures.tiny_model import build_tiny_model

    return build_tiny_model(model_sources / "tiny")


@pytest.fixture
def service(tmp_path: Path, redis_url: str, tiny_model_dir: Path) -> Iterator[Service]:
    """The API on a real port and one real Celery worker process, on a fresh Redis database."""
    flush(redis_url)
    svc = Service(base_path=tmp_path / "base", redis_url=redis_url, log_dir=tmp_path / "logs")
    svc.start()
    try:
        yield svc
    finally:
        svc.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """An S3-compatible server process (moto's server mode) for the object-storage tests."""
    server = S3Server(tmp_path_factory.mktemp("s3") / "moto.log").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket, with this process's AWS settings pointing at the server (as a deployment sets them)."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return s3_server.create_bucket(f"lora-{uuid.uuid4().hex[:12]}")
