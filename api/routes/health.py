"""Liveness and readiness probes (never behind the API key)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from api.deps import StoreDep
from api.errors import redact_url

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", response_model=None)
async def readyz(store: StoreDep) -> JSONResponse:
    url = redact_url(str(store.client.connection_pool.connection_kwargs.get("host", "")))
    try:
        workers = await run_in_threadpool(store.workers_alive, within_s=30.0)
    except Exception as exc:
        return JSONResponse(status_code=503, content={"status": "unavailable", "reason": f"Redis {url}: {exc}"})
    if not workers:
        return JSONResponse(status_code=503, content={"status": "unavailable", "reason": "no worker is alive"})
    return JSONResponse(content={"status": "ready", "workers": workers})
