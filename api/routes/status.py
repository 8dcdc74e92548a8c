"""`GET /status`: the seed's view of the current (else most recent) job."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.deps import SettingsDep, SlotsDep, StoreDep
from api.errors import NotFound
from api.routes.jobs import cancel_response
from shared import workers
from shared.job_api import SeedStatusPublic

router = APIRouter(tags=["training"])


@router.get("/status", response_model_exclude_none=True)
def status(store: StoreDep, settings: SettingsDep) -> SeedStatusPublic:
    record = store.current()
    shown = SeedStatusPublic.idle() if record is None else SeedStatusPublic.from_record(record)
    shown.capacity = workers.overview(store.client, settings, store.slot_holders())
    return shown


@router.post("/cancel", responses={404: {"description": "no current job"}, 409: {"description": "already ended"}})
def cancel_current(store: StoreDep, slots: SlotsDep) -> JSONResponse:
    """Cancel the current job (the seed-style counterpart of `POST /jobs/{id}/cancel`)."""
    active = store.active_ids()
    if not active:
        raise NotFound("no job is queued or training")
    return cancel_response(store, active[0], slots)
