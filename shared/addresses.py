"""Which listening addresses keep the server to this machine.

Both the API (its start-up warning) and the launcher (its ready banner) warn when the server listens beyond
loopback without LORA_API_KEY; one definition keeps the two warnings from disagreeing about an address."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """Whether `host` (a bind address as given to uvicorn) is reachable only from this machine.

    A host name other than `localhost` is not resolved: it may name any interface, so it counts as open."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
