"""Base models as the Tinker API sees them: api.base_models' one rule, and what a base's config.json says
(its vocabulary, for checking token ids; its context length) read as JSON: the API never loads a model."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from api.base_models import MODEL_CONFIG, BaseModel, ModelRefused, check_base_model, hub_cache
from api.tinker.errors import bad_request
from shared.settings import Settings
from shared.store import JobStore


def accepted_base(settings: Settings, name: str, call: str, field: str = "base_model") -> BaseModel:
    try:
        return check_base_model(settings, name)
    except ModelRefused as exc:
        raise bad_request(call, field, str(exc)) from exc


def same_base(settings: Settings, a: str, b: str) -> bool:
    """Whether two names the clients gave stand for one base (its canonical name), without asking the hub."""
    if a == b:
        return True
    try:
        return (
            check_base_model(settings, a, online=False).canonical
            == check_base_model(settings, b, online=False).canonical
        )
    except ModelRefused:
        return False


def model_config(base: BaseModel) -> dict[str, Any]:
    """The base's config.json (empty when it cannot be read here: a hub id not in this host's cache)."""
    path: Path | None = None
    if base.is_folder:
        path = Path(base.location) / MODEL_CONFIG
    else:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(base.location, MODEL_CONFIG, cache_dir=hub_cache())
        path = Path(found) if isinstance(found, str) else None
    if path is None:
        return {}
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _lookup(config: dict[str, Any], key: str) -> int | None:
    for part in (config, config.get("text_config") or {}):
        value = part.get(key) if isinstance(part, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def vocab_size(base: BaseModel) -> int | None:
    return _lookup(model_config(base), "vocab_size")


def context_length(base: BaseModel) -> int | None:
    return _lookup(model_config(base), "max_position_embeddings")


def _candidate_names(store: JobStore, settings: Settings) -> list[str]:
    """Names of bases this service can load now: every model folder directly in a models directory
    (LORA_MODELS_DIR), the allow-list's exact names, and the bases jobs have loaded (the catalog's index)."""
    names: list[str] = []
    for folder in settings.models_dir:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        names += [entry.name for entry in entries if (Path(entry.path) / MODEL_CONFIG).is_file()]
    names += [p for p in settings.allowed_models if not any(ch in p for ch in "*?[")]
    names += [name for name, _ in store.base_models()]
    return names


def supported_models(store: JobStore, settings: Settings) -> list[dict[str, Any]]:
    """get_server_capabilities' list: each base api.base_models' rule accepts today (without asking the hub), once."""
    seen: set[str] = set()
    listed: list[dict[str, Any]] = []
    for name in _candidate_names(store, settings):
        try:
            base = check_base_model(settings, name, online=False)
        except ModelRefused:
            continue
        if base.canonical in seen:
            continue
        seen.add(base.canonical)
        item: dict[str, Any] = {"model_name": base.canonical, "trainable": True, "sampleable": True}
        length = context_length(base)
        if length is not None:
            item["max_context_length"] = length
        listed.append(item)
    return listed
