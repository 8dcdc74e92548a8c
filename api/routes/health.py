"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool

from api.auth import key_matches
from api.deps import SettingsDep, StoreDep
from api.errors import REDIS_DOWN, store_unavailable
from shared import workers
from shared.jobs import JobStatus
from shared.settings import Settings
from shared.store import JobStore
from shared.tasks import QUEUE

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up (no dependencies checked)."""
    return {"status": "ok"}


@router.get("/readyz", response_model=None, responses={503: {"description": "Redis or workers unavailable"}})
async def readyz(request: Request, store: StoreDep, settings: SettingsDep) -> JSONResponse:
    """Redis reachable and at least one worker alive.

    The probe stays open (orchestrators ask without secrets), but with LORA_API_KEY set only a caller with the
    key learns the details (worker names, where Redis is): the status code alone is what a probe needs."""
    given = dict(request.scope["headers"]).get(b"authorization", b"")
    detailed = not settings.api_key or key_matches(given, settings.api_key)  # "" (compose's unset) is no key
    try:
        alive = await run_in_threadpool(workers.live, store.client, settings)
    except REDIS_DOWN as exc:
        reason = store_unavailable(exc, settings.redis_url).message
        return _unavailable(reason if detailed else None)
    if not alive:
        return _unavailable(
            f"no worker has reported in the last {workers.fresh_s(settings):.0f} s" if detailed else None
        )
    names = [info.name for info, _ in alive]
    return JSONResponse(content={"status": "ready", "workers": names} if detailed else {"status": "ready"})


@router.get("/health", responses={503: {"description": "Redis unreachable"}})
def health(store: StoreDep, settings: SettingsDep) -> workers.Capacity:
    """The training workers that are alive (host, GPU, busy or free, the job each trains) and the slots they
    bring: what admission counts."""
    return workers.overview(store.client, settings, store.slot_holders())


def _unavailable(reason: str | None) -> JSONResponse:
    content = {"status": "unavailable"} if reason is None else {"status": "unavailable", "reason": reason}
    return JSONResponse(status_code=503, content=content)


def _metrics_text(store: JobStore, settings: Settings) -> str:
    counts = store.count_by_status()
    lines = [
        "# HELP lora_jobs Jobs by status.",
        "# TYPE lora_jobs gauge",
        *(f'lora_jobs{{status="{s.value}"}} {counts.get(s.value, 0)}' for s in JobStatus),
        "# HELP lora_queue_depth Training tasks waiting in the broker queue.",
        "# TYPE lora_queue_depth gauge",
        f"lora_queue_depth {store.client.llen(QUEUE)}",
        "# HELP lora_workers_alive Workers that reported recently.",
        "# TYPE lora_workers_alive gauge",
        f"lora_workers_alive {len(workers.live(store.client, settings))}",
        "# HELP lora_training_slots Training slots the live workers bring (capped by LORA_MAX_CONCURRENT_JOBS).",
        "# TYPE lora_training_slots gauge",
        f"lora_training_slots {workers.capacity(store.client, settings)}",
        "# HELP lora_training_tokens_per_second Real (unpadded) tokens per second of each running job.",
        "# TYPE lora_training_tokens_per_second gauge",
        "# HELP lora_training_step_seconds Wall time of the latest optimizer step of each running job.",
        "# TYPE lora_training_step_seconds gauge",
        "# HELP lora_training_loss Latest logged training loss of each running job.",
        "# TYPE lora_training_loss gauge",
    ]
    for job_id in store.active_ids():
        record = store.get(job_id)
        if record is None or record.status is not JobStatus.running:
            continue
        p = record.progress
        for name, value in (
            ("lora_training_tokens_per_second", p.tokens_per_second),
            ("lora_training_step_seconds", p.step_seconds),
            ("lora_training_loss", p.loss),
        ):
            if value is not None:
                lines.append(f'{name}{{job_id="{job_id}"}} {value}')
    return "\n".join(lines) + "\n"


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(store: StoreDep, settings: SettingsDep) -> PlainTextResponse:
    """Prometheus text exposition format."""
    return PlainTextResponse(_metrics_text(store, settings), media_type="text/plain; version=0.0.4")
