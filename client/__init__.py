"""The lora-server HTTP client: `from client import LoraClient`."""

from client.archive import UnsafeArchiveError, extract_tar_safely
from client.http import DEFAULT_URL, ApiClientError, LoraClient

__all__ = ["DEFAULT_URL", "ApiClientError", "LoraClient", "UnsafeArchiveError", "extract_tar_safely"]
