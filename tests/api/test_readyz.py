"""/readyz stays open to probes; with LORA_API_KEY set, only a caller with the key learns worker names and where
Redis is."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from launcher.embedded_redis import free_port
from shared import workers
from shared.settings import Settings
from shared.store import JobStore

KEY = "s3cret-key"


def _readyz(settings: Settings, headers: dict[str, str] | None = None) -> tuple[int, dict[str, object]]:
    with TestClient(create_app(settings)) as api:
        r = api.get("/readyz", headers=headers or {})
    return r.status_code, r.json()


@pytest.mark.parametrize("key", [None, ""], ids=["unset", "empty"])  # compose passes an unset key as ""
def test_without_a_key_configured_the_details_are_shown(settings: Settings, store: JobStore, key: str | None) -> None:
    settings = settings.model_copy(update={"api_key": key})
    status, body = _readyz(settings)
    assert status == 503 and str(body.pop("reason")).startswith("no worker has reported in the last")
    assert body == {"status": "unavailable"}
    workers.announce(store.client, workers.WorkerInfo(name="gpu0@host-a", host="host-a"), settings)
    assert _readyz(settings) == (200, {"status": "ready", "workers": ["gpu0@host-a"]})


@pytest.mark.parametrize(
    ("headers", "detailed"),
    [
        ({}, False),
        ({"Authorization": "Bearer wrong"}, False),
        ({"Authorization": KEY}, False),  # not a bearer token
        ({"Authorization": f"Bearer {KEY}"}, True),
    ],
)
def test_with_a_key_only_its_holder_sees_the_workers(
    settings: Settings, store: JobStore, headers: dict[str, str], detailed: bool
) -> None:
    keyed = settings.model_copy(update={"api_key": KEY})
    status, body = _readyz(keyed, headers)
    assert status == 503
    reason = body.pop("reason", None)
    assert body == {"status": "unavailable"}
    assert str(reason).startswith("no worker has reported") if detailed else reason is None
    workers.announce(store.client, workers.WorkerInfo(name="gpu0@host-a", host="host-a"), settings)
    status, body = _readyz(keyed, headers)
    assert status == 200
    assert body == ({"status": "ready", "workers": ["gpu0@host-a"]} if detailed else {"status": "ready"})


@pytest.mark.parametrize(("headers", "detailed"), [({}, False), ({"Authorization": f"Bearer {KEY}"}, True)])
def test_with_a_key_redis_down_hides_where_redis_is(tmp_path: Path, headers: dict[str, str], detailed: bool) -> None:
    unreachable = Settings(base_path=tmp_path, redis_url=f"redis://:pw@127.0.0.1:{free_port()}/0", api_key=KEY)
    status, body = _readyz(unreachable, headers)
    assert status == 503
    if detailed:
        assert str(body["reason"]).startswith("the broker/job store (Redis at redis://***@127.0.0.1:")
    else:
        assert body == {"status": "unavailable"}
