"""The settings that enable webhooks: receiver URLs and the signing secret, read and checked."""

from __future__ import annotations

import base64
import os

import pytest
from pydantic import ValidationError

from shared.settings import Settings

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()


@pytest.mark.parametrize(
    "value",
    ["http://a.example/h,https://b.example:8443/x", ' http://a.example/h , https://b.example:8443/x ,',
     '["http://a.example/h", "https://b.example:8443/x"]'],
)  # fmt: skip
def test_webhook_urls_from_the_environment_comma_separated_or_a_json_list(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORA_WEBHOOK_URL", value)
    monkeypatch.setenv("LORA_WEBHOOK_SECRET", SECRET)
    settings = Settings()
    assert settings.webhook_url == ["http://a.example/h", "https://b.example:8443/x"]
    assert settings.webhook_secret is not None and settings.webhook_secret.get_secret_value() == SECRET


def test_no_webhook_settings_means_no_webhooks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORA_WEBHOOK_URL", raising=False)
    monkeypatch.delenv("LORA_WEBHOOK_SECRET", raising=False)
    assert Settings().webhook_url == [] and Settings().webhook_secret is None


def test_webhook_urls_without_a_secret_are_refused() -> None:
    with pytest.raises(ValidationError, match="LORA_WEBHOOK_URL is set but LORA_WEBHOOK_SECRET is not"):
        Settings(webhook_url="http://a.example/h")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("secret", "why"),
    [
        (base64.b64encode(os.urandom(32)).decode(), "must start with 'whsec_'"),
        ("whsec_not*base64!", "not valid base64"),
        ("whsec_" + base64.b64encode(os.urandom(32)).decode().rstrip("="), "not valid base64"),  # unpadded
        ("whsec_" + base64.b64encode(b"short").decode(), "holds 5 bytes"),
        ("whsec_", "holds 0 bytes"),
    ],
    ids=["no-prefix", "not-base64", "unpadded", "too-short", "empty"],
)
def test_a_malformed_webhook_secret_is_a_configuration_error(secret: str, why: str) -> None:
    with pytest.raises(ValidationError, match=why) as refused:
        Settings(webhook_url="http://a.example/h", webhook_secret=secret)  # type: ignore[arg-type]
    key = secret.removeprefix("whsec_")
    assert not key or key not in str(refused.value)  # the secret is not echoed into logs


def test_a_webhook_url_must_be_http() -> None:
    with pytest.raises(ValidationError, match="is not an http"):
        Settings(webhook_url="ftp://a.example/h", webhook_secret=SECRET)  # type: ignore[arg-type]
