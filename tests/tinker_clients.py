"""The `tinker` SDK's clients in tests: made here, and closed (with what they leave collected) at the end.

The SDK's HTTP pools leave sockets for the garbage collector even after its clients are closed (its own leak,
not the server's). Left to the interpreter's last collection, their ResourceWarnings fail the whole run; closed
and collected in each test's teardown, they are that test's, where the module's marks ignore them.
"""

from __future__ import annotations

import contextlib
import gc
import time
import warnings

import tinker

_OPEN: list[tinker.ServiceClient | tinker.RestClient] = []


def track(client: tinker.ServiceClient | tinker.RestClient) -> tinker.ServiceClient | tinker.RestClient:
    _OPEN.append(client)
    return client


def service_client(base_url: str, api_key: str) -> tinker.ServiceClient:
    client = tinker.ServiceClient(base_url=base_url, api_key=api_key)
    _OPEN.append(client)
    return client


def close_all() -> None:
    """Stop the clients' background loops (heartbeats, pools) while the API still answers, and collect them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        while _OPEN:
            client = _OPEN.pop()
            with contextlib.suppress(Exception):  # already closed by its test, or the API is gone
                if isinstance(client, tinker.ServiceClient):
                    client.close("success").result(timeout=10)
                else:
                    client.holder.close()
        time.sleep(0.2)
        gc.collect()
