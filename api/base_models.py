"""Which base models a job may train on: the one rule, applied to every submission (`POST /train`, the
seed's `POST /merge`, `POST /v1/fine_tuning/jobs`) and to what `/v1/models` lists.

A base model is, in this order:

1. a model folder under base_path, named relative to it (`bases/tiny`) or by its absolute path;
2. a model folder under one of the configured models directories (LORA_MODELS_DIR), named relative to it
   or by its absolute path;
3. a hub id `org/name` that is in the local Hugging Face cache (HF_HUB_CACHE, else HF_HOME/hub) or, unless
   HF_HUB_OFFLINE is set, that the hub confirms (LORA_HUB_TIMEOUT_S; an unreachable hub is a refusal).

A folder is a model when it holds a `config.json`; symlinks are followed and must stay inside the folder
they start from. With LORA_ALLOWED_MODELS set, the name as given must also match one of its patterns.
Anything else is refused with `ModelRefused`, whose message says which rule failed.

One model has one name, decided here (`BaseModel.canonical`) and stored on the job: whatever spelling
reached it (`tiny`, `/abs/base/tiny`, `/abs/base/./tiny/`, a symlink to it), a folder is named by its path
relative to the first root that leads to it (its absolute path when no relative name does), and a hub id
by the spelling the hub (or the local cache) uses, without a trailing slash: the hub treats repo ids
case-insensitively. `/v1/models` lists one entry per canonical name and `ft:` names are built from it.
Where an allow-list is set, the canonical name is one it allows (else the name as given stays the name).
"""

from __future__ import annotations

import fnmatch
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from shared.settings import Settings

MODEL_CONFIG = "config.json"  # what makes a folder a model folder
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"  # the hub's repo name rules: 96 characters at most
HUB_ID = re.compile(rf"{_PART}/{_PART}")
_TRUE = {"1", "on", "yes", "true"}
NAME_MAX_CHARS = 1024


class ModelRefused(ValueError):
    """A base model name the deployment does not accept; the message says which rule it breaks."""


@dataclass(frozen=True)
class BaseModel:
    """An accepted base model: the name the user gave, what the worker loads (a folder, or the hub id) and the
    one name the service uses for it (the module's docstring)."""

    name: str
    location: str
    is_folder: bool
    canonical: str


def check_base_model(settings: Settings, name: str, *, online: bool = True) -> BaseModel:
    """The base model `name` stands for, or ModelRefused naming the rule it breaks. `online=False` never asks the
    hub (a hub id of the right form that is not in the cache is then accepted: for listings, not submissions)."""
    _check_form(name)
    _check_allowed(settings, name)
    folder = _model_folder(settings, name)
    if folder is None and settings.store is not None:
        folder = _stored_model_folder(settings, name)
    if folder is not None:
        return BaseModel(name, str(folder), is_folder=True, canonical=_folder_name(settings, folder, name))
    repo_id = name[:-1] if name.endswith("/") else name  # `org/name/` is the hub's `org/name`
    if not HUB_ID.fullmatch(repo_id) or "--" in repo_id or ".." in repo_id:
        raise ModelRefused(
            f"{_quoted(name)} is neither a model folder under base_path or a models directory (LORA_MODELS_DIR) "
            "nor a hub id of the form 'org/name'"
        )
    spelled = _cached_spelling(repo_id)
    if online and spelled is None:
        spelled = _check_on_hub(settings, repo_id)
    # The worker loads the hub's spelling: the cache keeps a model's files under it.
    location = spelled or repo_id
    return BaseModel(name, location, is_folder=False, canonical=_allowed_or(settings, [location], name))


def servable_location(settings: Settings, name: str) -> str | None:
    """What a worker loads for `name` if it passes the rule today without asking the hub (what /v1/models may
    list), else None."""
    try:
        return check_base_model(settings, name, online=False).location
    except ModelRefused:
        return None


# --------------------------------------------------------------------------- the rules


def _check_form(name: str) -> None:
    if not name:
        raise ModelRefused("model name is empty")
    if len(name) > NAME_MAX_CHARS:
        raise ModelRefused(f"model name is longer than {NAME_MAX_CHARS} characters")
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in name):
        raise ModelRefused("model name contains a control character (NUL, newline, ...) or a lone surrogate")
    if ".." in Path(name).parts:
        raise ModelRefused(f"{_quoted(name)} contains a '..' component: a model folder is named from inside its root")


def _allowed(settings: Settings, name: str) -> bool:
    patterns = settings.allowed_models
    return not patterns or any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _check_allowed(settings: Settings, name: str) -> None:
    if not _allowed(settings, name):
        raise ModelRefused(f"{_quoted(name)} is not in this deployment's allowed models (LORA_ALLOWED_MODELS)")


def _allowed_or(settings: Settings, candidates: list[str], given: str) -> str:
    """The first candidate name the allow-list accepts (any, without one), else the name as given (which it
    accepted): the canonical name must itself be one a client may use."""
    return next((c for c in candidates if _allowed(settings, c)), given)


def _folder_name(settings: Settings, folder: Path, given: str) -> str:
    """A model folder's one name: its path relative to the first root the rule finds it under by that name
    (`tiny`, `bases/tiny`), else its absolute path."""
    candidates: list[str] = []
    for root, _ in _roots(settings):
        resolved_root = root.resolve()
        if not folder.is_relative_to(resolved_root) or folder == resolved_root:
            continue
        relative = folder.relative_to(resolved_root).as_posix()
        try:
            if _model_folder(settings, relative) == folder:
                candidates.append(relative)
                break
        except ModelRefused:
            continue
    return _allowed_or(settings, [*candidates, str(folder)], given)


def _roots(settings: Settings) -> list[tuple[Path, str]]:
    roots = [(settings.base_path, "base_path")]
    return roots + [(folder, f"the models directory {str(folder)!r}") for folder in settings.models_dir]


def _model_folder(settings: Settings, name: str) -> Path | None:
    """The model folder `name` names under one of the roots; None when it names no existing path there (a hub id).
    ModelRefused for an absolute path outside every root, a path leading out of its root, or a folder without
    a model's config."""
    candidate = Path(name)
    for root, label in _roots(settings):
        if not candidate.is_absolute() and not os.path.lexists(root / candidate):
            continue
        resolved_root = root.resolve()
        if candidate.is_absolute() and not _within(candidate, root, resolved_root):
            continue
        try:
            target = (root / candidate).resolve(strict=True)
        except (OSError, RuntimeError, ValueError) as exc:  # a dangling link, a loop, an unreadable component
            raise ModelRefused(f"{_quoted(name)} cannot be resolved under {label}: {exc.__class__.__name__}") from exc
        if not target.is_relative_to(resolved_root) or target == resolved_root:
            raise ModelRefused(f"{_quoted(name)} resolves outside {label} (through '..' or a symlink)")
        if not (target / MODEL_CONFIG).is_file():
            raise ModelRefused(f"{_quoted(name)} under {label} is not a model folder: it has no {MODEL_CONFIG}")
        return target
    if candidate.is_absolute():
        raise ModelRefused(
            f"{_quoted(name)} is an absolute path outside base_path and every models directory (LORA_MODELS_DIR)"
        )
    return None


def _stored_model_folder(settings: Settings, name: str) -> Path | None:
    """With object storage: the model folder `name` names under base_path in the store (its config.json there),
    which each worker stages and caches; None when the store has none by that name. StorageUnavailable when
    the store cannot be read."""
    store = settings.store
    assert store is not None
    base = settings.base_path.resolve()
    candidate = Path(os.path.normpath(base / name))
    if candidate == base or not candidate.is_relative_to(base):
        return None
    if MODEL_CONFIG not in store.listed_folder(candidate):
        return None
    return candidate


def _within(path: Path, root: Path, resolved_root: Path) -> bool:
    """Whether absolute `path`, as written (its links not followed yet), lies under `root`."""
    normal = Path(os.path.normpath(path))
    return normal.is_relative_to(Path(os.path.normpath(root.absolute()))) or normal.is_relative_to(resolved_root)


def hub_cache() -> Path:
    """The Hugging Face hub cache, from the environment as it is now (huggingface_hub reads it once, at import)."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.environ[variable]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


_CACHE_PREFIX = "models--"


def _cached_spelling(repo_id: str) -> str | None:
    """How the local hub cache spells `repo_id` (the hub's own spelling, as it was downloaded), when it holds
    the model's config under any capitalisation of it; else None."""
    from huggingface_hub import try_to_load_from_cache

    cache = hub_cache()
    if isinstance(try_to_load_from_cache(repo_id, MODEL_CONFIG, cache_dir=cache), str):
        return repo_id
    wanted = (_CACHE_PREFIX + repo_id.replace("/", "--")).casefold()
    try:
        folders = sorted(entry.name for entry in os.scandir(cache) if entry.name.casefold() == wanted)
    except OSError:
        return None
    for folder in folders:
        spelled = folder[len(_CACHE_PREFIX) :].replace("--", "/", 1)
        if isinstance(try_to_load_from_cache(spelled, MODEL_CONFIG, cache_dir=cache), str):
            return spelled
    return None


def _check_on_hub(settings: Settings, repo_id: str) -> str:
    """A hub id the hub confirms (unless offline), as the hub spells it; ModelRefused otherwise."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, OfflineModeIsEnabled, RepositoryNotFoundError

    offline = f"hub id {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
    if hub_offline():
        raise ModelRefused(offline)
    try:
        info = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None).model_info(repo_id, timeout=settings.hub_timeout_s)
    except OfflineModeIsEnabled as exc:  # offline when huggingface_hub was imported (it reads the variable once)
        raise ModelRefused(offline) from exc
    except GatedRepoError:
        return repo_id  # it exists; the worker's token decides whether it may download it
    except RepositoryNotFoundError as exc:
        raise ModelRefused(f"hub id {repo_id!r} is not a model on the Hugging Face hub") from exc
    except Exception as exc:  # no connection, a timeout, the hub failing: all mean "cannot confirm"
        raise ModelRefused(
            f"hub id {repo_id!r} is not in the local Hugging Face cache and the hub could not be reached "
            f"({exc.__class__.__name__})"
        ) from exc
    spelled = getattr(info, "id", None)
    return spelled if isinstance(spelled, str) and spelled.casefold() == repo_id.casefold() else repo_id


def _quoted(name: str, limit: int = 80) -> str:
    return repr(name) if len(name) <= limit else repr(name[:limit]) + "..."
