"""The jobs resource."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import StoreDep
from api.errors import ApiError
from api.schemas import JobPublic

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.get("/{job_id}", responses={404: {"description": "no such job"}})
def get_job(job_id: str, store: StoreDep) -> JobPublic:
    record = store.get(job_id)
    if record is None:
        raise ApiError(404, f"no job {job_id!r}")
    return JobPublic.from_record(record)
