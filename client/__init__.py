"""The lora-server HTTP client: `from client import LoraClient`."""

from client.archive import UnsafeArchiveError, extract_tar_safely
from client.chat import ChatStreamError, ModelList, ModelPublic
from client.http import DEFAULT_URL, ApiClientError, LoraClient

__all__ = [
    "DEFAULT_URL",
    "ApiClientError",
    "ChatStreamError",
    "LoraClient",
    "ModelList",
    "ModelPublic",
    "UnsafeArchiveError",
    "extract_tar_safely",
]
