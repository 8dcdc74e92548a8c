"""`GET /status`: the seed's view of the current (else most recent) job."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import StoreDep
from api.schemas import SeedStatusPublic

router = APIRouter(tags=["training"])


@router.get("/status", response_model_exclude_none=True)
def status(store: StoreDep) -> SeedStatusPublic:
    record = store.current()
    return SeedStatusPublic.idle() if record is None else SeedStatusPublic.from_record(record)
