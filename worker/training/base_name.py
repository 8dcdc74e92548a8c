"""What an adapter (or a merged model) records as its base model: a name that finds the base from anywhere.

PEFT writes `base_model_name_or_path` from the name the base was loaded by. Loaded by a relative folder
(`./models/tiny`) that only finds the base from the loading process's working directory, and loaded from a
hub cache snapshot it is a path inside one host's cache. So the recorded base is a hub id for a hub model
(also when it was loaded from its cache snapshot) and an absolute path for any other folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from peft import PeftModel

from shared.volume import ADAPTER_CONFIG

_CACHE_PREFIX = "models--"  # huggingface_hub's cache: <cache>/models--org--name/snapshots/<revision>/


def recorded_base(name: str) -> str:
    """The base model as an adapter records it: the hub id, or the folder's absolute path."""
    if not name:
        return name
    folder = Path(name).expanduser()
    if not folder.is_dir():  # a hub id (transformers loads a local folder first, as this does)
        return name.rstrip("/")
    resolved = folder.resolve()
    return hub_id_of_snapshot(resolved) or str(resolved)


def hub_id_of_snapshot(folder: Path) -> str | None:
    """`org/name` when `folder` is a snapshot in a Hugging Face hub cache, else None."""
    if folder.parent.name != "snapshots" or not folder.parent.parent.name.startswith(_CACHE_PREFIX):
        return None
    parts = folder.parent.parent.name[len(_CACHE_PREFIX) :].split("--")
    return "/".join(parts) if len(parts) == 2 and all(parts) else None


def save_adapter(model: PeftModel, folder: Path, base: str) -> None:
    """`model.save_pretrained(folder)`, its adapter_config.json naming `base` (`recorded_base`'s name).

    While it saves, PEFT's configs name a local copy of the base when there is one (the hub cache's snapshot
    for a hub id): PEFT looks the base's config.json up when it saves, on the hub (a request per save, a
    warning when offline) unless the name is a local folder. Its configs name what they did before, after.
    """
    configs = list(model.peft_config.values())
    before = [config.base_model_name_or_path for config in configs]
    local = _local_copy(base)
    try:
        for config in configs:
            config.base_model_name_or_path = local
        model.save_pretrained(str(folder))
    finally:
        for config, name in zip(configs, before, strict=True):
            config.base_model_name_or_path = name
    for path in folder.rglob(ADAPTER_CONFIG):  # one per adapter (others in subfolders)
        saved = json.loads(path.read_text())
        saved["base_model_name_or_path"] = base
        path.write_text(json.dumps(saved, indent=2, sort_keys=True))


def _local_copy(base: str) -> str:
    """A local folder holding `base`'s config: the folder itself, or a hub id's snapshot in the cache; else `base`."""
    if os.path.isdir(base):
        return base
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(base, "config.json")
    except Exception:  # not a valid repo id: nothing cached under it
        return base
    return os.path.dirname(cached) if isinstance(cached, str) else base
