"""Keeping user-supplied paths inside the service's volume."""

from __future__ import annotations

from pathlib import Path


class PathOutsideBaseError(ValueError):
    """A user path that resolves outside base_path."""


def resolve_inside(base: Path, user_path: str) -> Path:
    """Resolve `user_path` against `base`; refuse anything that lands outside it.

    Absolute paths are accepted only when they already point inside `base`. Symlinks are
    resolved first, so a link inside the volume cannot lead out of it.
    """
    root = base.resolve()
    candidate = Path(user_path)
    target = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if target == root or root not in target.parents:
        raise PathOutsideBaseError(f"{user_path!r} resolves outside base_path")
    return target
