"""Property-based fuzzing of the whole OpenAPI schema with schemathesis: no input gets a 5xx.

Every operation the app documents is fuzzed over real HTTP against the real service (uvicorn, a
Celery worker, a Redis-compatible server), with data that fits the schema and data that does not
(negative mode: wrong types, missing fields, odd headers), a bounded number of examples each.
The schema is the app's own (`create_app().openapi()`), checked equal to what the service serves.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from api.main import create_app
from shared.settings import Settings
from tests.service import Service, flush

MAX_EXAMPLES = 60  # per operation and generation mode; the whole run stays within a couple of minutes

RAW_SCHEMA: dict[str, Any] = create_app(Settings()).openapi()
schema = schemathesis.openapi.from_dict(RAW_SCHEMA)
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], database="none")


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory, redis_url: str, tiny_model_dir: Path) -> Iterator[Service]:
    url = redis_url.rsplit("/", 1)[0] + "/7"  # a database of its own: no other fixture flushes it
    flush(url)
    root = tmp_path_factory.mktemp("fuzz")
    svc = Service(base_path=root / "base", redis_url=url, log_dir=root / "logs", env_extra={"LORA_MAX_UPLOAD_MB": "2"})
    svc.start()
    try:
        yield svc
    finally:
        svc.stop()


def test_the_fuzzed_schema_is_the_one_served(fuzzed: Service) -> None:
    assert fuzzed.get("/openapi.json").json() == RAW_SCHEMA


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
def test_no_input_gets_a_server_error(fuzzed: Service, case: schemathesis.Case) -> None:
    case.call_and_validate(base_url=fuzzed.url, checks=[not_a_server_error], timeout=30)
