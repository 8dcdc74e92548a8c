"""The Tinker SDK's service calls: client configuration, health, telemetry, capabilities, sessions, and the
calls this server does not implement (refused at once, never retried)."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from api.deps import SettingsDep, StoreDep
from api.tinker.bases import supported_models
from api.tinker.errors import TinkerRefusal, not_found, unsupported
from api.tinker.schemas import CreateSession, SessionRef, parse
from shared import tinker_store as ts
from shared.store import JobStore

router = APIRouter(prefix="/api/v1", tags=["tinker"])

# What the SDK must do with this server: the key as sent (no JWT exchange), plain httpx (no pyqwest), plain
# protobuf bodies, and a forward_backward's chunks one after another.
CLIENT_CONFIG = {
    "pjwt_auth_enabled": False,
    "use_pyqwest_transport": False,
    "proto_compress_fwdbwd": False,
    "parallel_fwdbwd_chunks": False,
}


@router.post("/client/config")
async def client_config() -> dict[str, Any]:
    return CLIENT_CONFIG


@router.post("/client/dynamic_config")
async def dynamic_config() -> dict[str, Any]:
    return {}


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.post("/telemetry")
async def telemetry() -> dict[str, str]:
    return {"status": "accepted"}  # dropped: this server keeps no client telemetry


@router.get("/get_server_capabilities")
async def get_server_capabilities(store: StoreDep, settings: SettingsDep) -> dict[str, Any]:
    return {"supported_models": await run_in_threadpool(supported_models, store, settings)}


@router.post("/create_session")
async def create_session(request: Request, store: StoreDep, settings: SettingsDep) -> dict[str, Any]:
    body = await parse(request, CreateSession, "create_session", settings)
    session = ts.TinkerSession(
        session_id=str(uuid.uuid4()), created_ms=ts.now_ms(), tags=body.tags, user_metadata=body.user_metadata
    )
    await run_in_threadpool(ts.save_session, store.client, session)
    return {"session_id": session.session_id, "type": "create_session"}


def _session(store: JobStore, call: str, session_id: str) -> ts.TinkerSession:
    session = ts.get_session(store.client, session_id)
    if session is None:
        raise not_found(call, "session_id", f"no session {session_id[:100]!r}")
    return session


def _heartbeat(store: JobStore, session_id: str) -> None:
    session = _session(store, "session_heartbeat", session_id)
    if session.finished:  # 410 stops the SDK's heartbeat loop
        raise TinkerRefusal(410, f"session_heartbeat: session {session_id!r} has finished", "finished")
    ts.touch_session(store.client, session_id)


@router.post("/session_heartbeat")
async def session_heartbeat(request: Request, store: StoreDep, settings: SettingsDep) -> dict[str, Any]:
    body = await parse(request, SessionRef, "session_heartbeat", settings)
    await run_in_threadpool(_heartbeat, store, body.session_id)
    return {"type": "session_heartbeat"}


def _finish(store: JobStore, session_id: str) -> None:
    _session(store, "finish_session", session_id)
    ts.finish_session(store.client, session_id)
    for model_id in ts.session_models(store.client, session_id):
        model = ts.get_model(store.client, model_id)
        if model is not None and not model.closed:
            model.closed = True  # its host ends once it has run what was queued
            ts.save_model(store.client, model)


@router.post("/sessions/{session_id}/finish")
async def finish_session(session_id: str, store: StoreDep) -> dict[str, Any]:
    await run_in_threadpool(_finish, store, session_id)
    return {}


@router.get("/sessions")
async def list_sessions(store: StoreDep, limit: int = 20, offset: int = 0) -> dict[str, Any]:
    limit, offset = max(1, min(limit, 1000)), max(0, min(offset, 10**9))
    ids = await run_in_threadpool(store.client.zrevrange, ts.keys.TINKER_SESSIONS, offset, offset + limit - 1)
    return {"sessions": ids}


def _session_info(store: JobStore, session_id: str) -> dict[str, Any]:
    session = _session(store, "get_session", session_id)
    body: dict[str, Any] = {
        "training_run_ids": ts.session_models(store.client, session_id),
        "sampler_ids": ts.session_samplers(store.client, session_id),
    }
    if session.user_metadata is not None:
        body["user_metadata"] = session.user_metadata
    return body


@router.get("/sessions/{session_id}")
async def get_session(session_id: str, store: StoreDep) -> dict[str, Any]:
    return await run_in_threadpool(_session_info, store, session_id)


# --------------------------------------------------------------------------- not implemented here


def _refuse(call: str) -> Any:
    async def refuse() -> None:
        raise unsupported(call)

    return refuse


for _method, _path, _call in (
    ("POST", "/auth/token", "auth/token (JWT exchange)"),
    ("POST", "/cancel_future", "cancel_future"),
    ("POST", "/copy_weights", "copy_weights"),
    ("POST", "/create_custom_loss", "create_custom_loss (server-side custom losses)"),
    ("POST", "/save_weights_external", "save_weights_external"),
    ("POST", "/join_sampling_session", "join_sampling_session"),
    ("POST", "/retrieve_futures", "retrieve_futures"),
    ("POST", "/sessions/search", "sessions/search"),
    ("PUT", "/sessions/{session_id}/project", "sessions/{id}/project"),
    ("GET", "/sessions/{session_id}/trace_export", "sessions/{id}/trace_export"),
    ("POST", "/sessions/{session_id}/trace_export", "sessions/{id}/trace_export"),
    ("GET", "/audit", "audit"),
    ("GET", "/billing/usage/events", "billing/usage"),
    ("GET", "/billing/usage/checkpoints/current", "billing/usage"),
):
    router.add_api_route(_path, _refuse(_call), methods=[_method], include_in_schema=False)
