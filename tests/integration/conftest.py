"""Fixtures of the integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service import Service, flush


@pytest.fixture
def make_service(tmp_path: Path, redis_url: str, tiny_model_dir: Path) -> Iterator[type[Service]]:
    """Start a service with extra environment (and, optionally, its own Redis); all are stopped at the end."""
    started: list[Service] = []

    def factory(redis_url: str = redis_url, **env: str) -> Service:
        flush(redis_url)
        svc = Service(base_path=tmp_path / "base", redis_url=redis_url, log_dir=tmp_path / "logs", env_extra=env)
        svc.start()
        started.append(svc)
        return svc

    yield factory  # type: ignore[misc]
    for svc in started:
        svc.stop()
