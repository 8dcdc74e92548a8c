"""Keeping user-supplied paths inside the service's volume, and finding a base model's folder there (the API resolves both at submission)."""

from __future__ import annotations

import os
from pathlib import Path

NAME_MAX = 255  # bytes in one path component (Linux, most filesystems)
PATH_MAX = 4096  # bytes in a whole path, terminating NUL included (Linux)


class UnsafePathError(ValueError):
    """A user path the service refuses: malformed, too long, or leading out of base_path."""


class PathOutsideBaseError(UnsafePathError):
    """A user path that resolves outside base_path."""


def resolve_inside(base: Path, user_path: str) -> Path:
    """Resolve `user_path` against `base`; refuse anything that lands outside it.

    Absolute paths are accepted only when they already point inside `base`. Symlinks are
    resolved first, so a link inside the volume cannot lead out of it. Paths the filesystem
    could never hold (NUL, lone surrogates, over-long names) are refused here rather than
    failing later in a worker.
    """
    _check_form(user_path)
    root = base.resolve()
    candidate = Path(user_path)
    try:
        target = (candidate if candidate.is_absolute() else root / candidate).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # symlink loop, unreadable component
        raise UnsafePathError(f"{_short(user_path)} cannot be resolved: {exc.__class__.__name__}") from exc
    if target == root or root not in target.parents:
        raise PathOutsideBaseError(f"{_short(user_path)} resolves outside base_path")
    if len(os.fsencode(target)) >= PATH_MAX:
        raise UnsafePathError(f"{_short(user_path)} is longer than the {PATH_MAX - 1}-byte path limit")
    return target


def _check_form(user_path: str) -> None:
    if "\x00" in user_path:
        raise UnsafePathError("a path may not contain a NUL character")
    try:
        encoded = user_path.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UnsafePathError("a path must be valid Unicode (no lone surrogate escapes)") from exc
    if any(len(part) > NAME_MAX for part in encoded.split(b"/")):
        raise UnsafePathError(f"{_short(user_path)} has a component longer than {NAME_MAX} bytes")


def _short(user_path: str, limit: int = 80) -> str:
    """The path as quoted in messages: repr, cut so a huge value cannot bloat an error response."""
    return repr(user_path) if len(user_path) <= limit else repr(user_path[:limit]) + "..."


def model_location(base_path: Path, name: str) -> str:
    """Where a worker loads base model `name` from: the model folder of that name under `base_path`
    when there is one (so `"model_name": "my-model"` means `<base_path>/my-model` on every host),
    else `name` itself (a hub id, or a path on the worker)."""
    try:
        folder = resolve_inside(base_path, name)
    except UnsafePathError:
        return name
    return str(folder) if (folder / "config.json").is_file() else name
