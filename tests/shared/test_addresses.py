"""Which bind addresses count as this machine only: the API's start-up warning and the launcher's banner
both follow this answer."""

from __future__ import annotations

import pytest

from shared.addresses import is_loopback


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "127.8.9.10", "::1"])
def test_loopback_addresses_stay_on_this_machine(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.168.1.20", "10.0.0.1", "fe80::1", "my-box.lan"])
def test_wildcards_interfaces_and_host_names_are_open(host: str) -> None:
    # A host name other than localhost is not resolved: it may name any interface.
    assert not is_loopback(host)
