"""Request dependencies as named types, so route signatures read plainly."""

from __future__ import annotations

from typing import Annotated

from celery import Celery
from fastapi import Depends, Request

from api.job_actions import SlotKeeper, get_job
from shared.jobs import JobRecord
from shared.settings import Settings
from shared.store import JobStore


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _store(request: Request) -> JobStore:
    store: JobStore = request.app.state.store
    return store


def _celery(request: Request) -> Celery:
    celery: Celery = request.app.state.celery
    return celery


SettingsDep = Annotated[Settings, Depends(_settings)]
StoreDep = Annotated[JobStore, Depends(_store)]
CeleryDep = Annotated[Celery, Depends(_celery)]


def _job(job_id: str, store: StoreDep) -> JobRecord:
    return get_job(store, job_id)


# The job of a `/jobs/{job_id}/...` route: routes that take it answer 404 for an unknown id before running.
JobDep = Annotated[JobRecord, Depends(_job)]


def _slots(request: Request) -> SlotKeeper:
    return SlotKeeper(_store(request), _celery(request), _settings(request))


SlotsDep = Annotated[SlotKeeper, Depends(_slots)]
