"""The models this service can chat with, and what each name stands for.

- base models in use: every distinct base of a training job that got past loading it (it trained a step, or
  succeeded) and that api.base_models' rule still accepts (the base alone), once, by its one (canonical)
  name however the jobs spelled it: a name that was refused, or that no worker ever loaded, is never listed;
- every succeeded training job's model, by its `ft:` name (api.openai.model_names), its adapter folder;
- each checkpoint of those jobs, `ft:...:ckpt-step-N`, the checkpoint's folder.

A job id names its job's model too. Names are resolved on every request from the job store and the
volume, so a job's model can be used the moment it has succeeded.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from api.artifacts import adapter_dir, get_checkpoint, list_checkpoints
from api.base_models import ModelRefused, check_base_model
from api.errors import ModelNotFound
from api.openai.convert import name_parts
from api.openai.model_names import checkpoint_model_name, fine_tuned_model_name, parse_model_name
from api.openai.schemas import ORGANIZATION_ID
from api.openai.store import OpenAIStore
from api.paths import model_location
from shared import tinker_store as ts
from shared.jobs import JobRecord, JobStatus
from shared.settings import Settings
from shared.store import JobStore

BASE_OWNER = "system"  # OpenAI's owner of the models it ships; ours are the bases jobs train on
_PAGE = 500


@dataclass(frozen=True)
class ServedModel:
    id: str  # the name clients use
    created: int  # seconds since the epoch
    owned_by: str
    base_model: str  # what the generation worker loads
    adapter_path: str | None  # None: the base model alone


def _training_jobs(store: JobStore) -> Iterator[JobRecord]:
    """Every training job, newest first."""
    before: float | None = None
    while True:
        page = store.list_ids(before=before, limit=_PAGE)
        for job_id, _ in page:
            record = store.get(job_id)
            if record is not None and record.kind == "train":
                yield record
        if len(page) < _PAGE:
            return
        before = page[-1][1]


def _loaded_base(record: JobRecord, settings: Settings) -> str:
    """What the generation worker loads for a job's model: the base as its submission resolved it (jobs
    recorded before submissions resolved it: resolved now, the same way)."""
    return record.model_dir or model_location(settings.base_path, record.config.model_name)


def _name_parts(record: JobRecord, ostore: OpenAIStore) -> tuple[str, str | None]:
    return name_parts(record, ostore.get_job(record.id))


def _job_models(record: JobRecord, ostore: OpenAIStore, settings: Settings) -> list[ServedModel]:
    """A succeeded job's model and its checkpoints' (none when its adapter is gone from the volume)."""
    if record.status is not JobStatus.succeeded:
        return []
    folder = adapter_dir(settings.base_path, record.model_path, store=settings.store)
    if folder is None:
        return []
    model, suffix = _name_parts(record, ostore)
    base = _loaded_base(record, settings)
    finished = int(record.finished_at or record.created_at)
    served = [
        ServedModel(fine_tuned_model_name(model, suffix, record.id), finished, ORGANIZATION_ID, base, str(folder))
    ]
    for ckpt in list_checkpoints(settings.volume, record.id, store=settings.store):
        name = checkpoint_model_name(model, suffix, record.id, ckpt.step)
        served.append(ServedModel(name, int(ckpt.created_at), ORGANIZATION_ID, base, ckpt.path))
    return served


def loaded_its_base(record: JobRecord) -> bool:
    """Whether a worker got past loading the job's base model: it trained a step, or the job succeeded."""
    return record.kind == "train" and (record.status is JobStatus.succeeded or record.progress.current_step > 0)


def _servable(settings: Settings, name: str) -> tuple[str, str] | None:
    """A base model name's one name and what a worker loads for it, if the rule accepts it today without
    asking the hub; else None."""
    try:
        base = check_base_model(settings, name, online=False)
    except ModelRefused:
        return None
    return base.canonical, base.location


def _note_loaded_bases(store: JobStore, records: list[JobRecord], settings: Settings) -> dict[str, tuple[int, str]]:
    """Each base model the jobs loaded that the rule accepts today, by its one name, with its first use (ms)
    and what a worker loads for it, noted in the index of loaded bases (`JobStore.note_base_model`) that
    lets `resolve` find one without walking every job. A job's base is named again by today's rule (its
    spelling as sent): the allow-list or the folders may have changed since it was submitted."""
    first: dict[str, tuple[int, str]] = {}
    spellings: dict[str, tuple[str, str] | None] = {}
    for record in records:
        if not loaded_its_base(record):
            continue
        given = record.config.model_name
        if given not in spellings:
            spellings[given] = _servable(settings, given)
        servable = spellings[given]
        if servable is None:
            continue
        name, location = servable
        ms = int(record.created_at * 1000)
        if name not in first or ms < first[name][0]:
            first[name] = (ms, location)
    for name, (ms, _) in first.items():
        store.note_base_model(name, at_ms=ms)
    return first


def _base_model(name: str, first_use_ms: int, location: str) -> ServedModel:
    # A base model named by a model folder loads from there, as for training (`location`: api.base_models').
    return ServedModel(name, first_use_ms // 1000, BASE_OWNER, location, None)


def list_models(store: JobStore, ostore: OpenAIStore, settings: Settings) -> list[ServedModel]:
    """Base models first (oldest use first), then fine-tuned models newest first, each followed by its checkpoints."""
    records = list(_training_jobs(store))
    loaded = _note_loaded_bases(store, records, settings)
    tuned = [model for record in records for model in _job_models(record, ostore, settings)]
    bases = [
        _base_model(name, ms, location)
        for name, (ms, location) in sorted(loaded.items(), key=lambda item: (item[1][0], item[0]))
    ]
    return bases + tuned


TINKER_SCHEME = "tinker://"


def _tinker_checkpoint(store: JobStore, settings: Settings, name: str) -> ServedModel:
    """A Tinker training client's checkpoint, by its tinker:// path: its adapter on the base its client trained."""
    parts = name[len(TINKER_SCHEME) :].split("/")
    model = ts.get_model(store.client, parts[0]) if len(parts) == 3 else None
    info = ts.checkpoint(store.client, parts[0], name) if model is not None else None
    present = info is not None and (
        Path(info.folder).is_dir() if settings.store is None else settings.store.manifest(Path(info.folder)) is not None
    )
    if model is None or info is None or not present:
        raise ModelNotFound(
            name, ": no such Tinker checkpoint (the SDK's save_state / save_weights_for_sampler name one)"
        )
    servable = _servable(settings, model.base_model)
    if servable is None:
        raise ModelNotFound(name, f": its base model {model.base_model!r} is not allowed here today")
    return ServedModel(name, info.created_ms // 1000, ORGANIZATION_ID, servable[1], info.folder)


def resolve(store: JobStore, ostore: OpenAIStore, settings: Settings, name: str) -> ServedModel:
    """The model `name` stands for: a `ft:` name or job id, else a base model in use; ModelNotFound otherwise."""
    if name.startswith(TINKER_SCHEME):
        return _tinker_checkpoint(store, settings, name)
    ref = parse_model_name(name)
    if ref is not None:
        record = store.get(ref.job_id)
        if record is None or record.kind != "train":
            raise ModelNotFound(name, f": there is no job {ref.job_id!r}")
        if record.status is not JobStatus.succeeded:
            raise ModelNotFound(name, f": job {ref.job_id!r} is {record.status.value}, not succeeded")
        folder = adapter_dir(settings.base_path, record.model_path, store=settings.store)
        if folder is None:
            raise ModelNotFound(name, f": the adapter of job {ref.job_id!r} is no longer on the volume")
        model, suffix = _name_parts(record, ostore)
        if ref.step is None:
            return ServedModel(
                fine_tuned_model_name(model, suffix, record.id),
                int(record.finished_at or record.created_at),
                ORGANIZATION_ID,
                _loaded_base(record, settings),
                str(folder),
            )
        ckpt = get_checkpoint(settings.volume, record.id, ref.step, store=settings.store)
        if ckpt is None:
            raise ModelNotFound(name, f": job {ref.job_id!r} has no checkpoint at step {ref.step}")
        return ServedModel(
            checkpoint_model_name(model, suffix, record.id, ref.step),
            int(ckpt.created_at),
            ORGANIZATION_ID,
            _loaded_base(record, settings),
            ckpt.path,
        )
    servable = _servable(settings, name)
    if servable is None:  # refused today (gone, or no longer allowed): never loaded for chat
        raise ModelNotFound(name)
    canonical, location = servable  # any spelling of a base in use names it
    first_use = store.base_model_first_use(canonical)  # a base model in use: one lookup...
    if first_use is None:  # ...else one walk, for a name the rule accepts, to note bases loaded since the last
        noted = _note_loaded_bases(store, list(_training_jobs(store)), settings).get(canonical)
        first_use = noted[0] if noted is not None else None
    if first_use is None:
        raise ModelNotFound(name)
    return _base_model(canonical, first_use, location)
