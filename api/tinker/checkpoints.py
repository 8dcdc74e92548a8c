"""The RestClient's view of training runs (a run is a training model) and their checkpoints: list, describe,
delete. Publishing, TTLs and download URLs are not implemented here (refused at once)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.artifacts import iter_stored_tar_gz, iter_tar_gz, list_files, stored_folder
from api.deps import SettingsDep, StoreDep
from api.tinker import names
from api.tinker.errors import bad_request, not_found, unsupported
from api.tinker.schemas import WeightsInfo, parse
from shared import tinker_store as ts
from shared.settings import Settings
from shared.store import JobStore
from shared.volume import TINKER

router = APIRouter(prefix="/api/v1", tags=["tinker"])
OWNER = "local"  # one owner: everyone with the key


def _page(limit: int, offset: int) -> tuple[int, int]:
    return max(1, min(limit, 1000)), max(0, min(offset, 10**9))


def _run(store: JobStore, call: str, run_id: str) -> ts.TinkerModel:
    model = ts.get_model(store.client, run_id)
    if model is None:
        raise not_found(call, "training_run_id", f"no training run {run_id[:100]!r}")
    return model


def _run_json(store: JobStore, model: ts.TinkerModel) -> dict[str, Any]:
    saved = ts.checkpoints(store.client, model.model_id)
    training = [c for c in saved if c.checkpoint_type == "training"]
    sampler = [c for c in saved if c.checkpoint_type == "sampler"]
    last_ms = max([model.created_ms, *(c.created_ms for c in saved)])
    body: dict[str, Any] = {
        "training_run_id": model.model_id,
        "base_model": model.base_model,
        "model_owner": OWNER,
        "is_lora": True,
        "corrupted": False,
        "lora_rank": model.rank,
        "last_request_time": names.iso(last_ms),
        "user_metadata": model.user_metadata,
    }
    if training:
        body["last_checkpoint"] = names.checkpoint_json(training[-1])
    if sampler:
        body["last_sampler_checkpoint"] = names.checkpoint_json(sampler[-1])
    return body


def _list_run_checkpoints(store: JobStore, run_id: str) -> dict[str, Any]:
    _run(store, "list_checkpoints", run_id)
    return {"checkpoints": [names.checkpoint_json(c) for c in ts.checkpoints(store.client, run_id)]}


@router.get("/training_runs/{run_id}/checkpoints")
async def list_checkpoints(run_id: str, store: StoreDep) -> dict[str, Any]:
    return await run_in_threadpool(_list_run_checkpoints, store, run_id)


def _all_checkpoints(store: JobStore, limit: int, offset: int) -> dict[str, Any]:
    found = [c for model_id in ts.model_ids(store.client) for c in ts.checkpoints(store.client, model_id)]
    found.sort(key=lambda c: c.created_ms, reverse=True)
    page = found[offset : offset + limit]
    return {
        "checkpoints": [names.checkpoint_json(c) for c in page],
        "cursor": {"offset": offset, "limit": limit, "total_count": len(found)},
    }


@router.get("/checkpoints")
async def list_user_checkpoints(store: StoreDep, limit: int = 100, offset: int = 0) -> dict[str, Any]:
    limit, offset = _page(limit, offset)
    return await run_in_threadpool(_all_checkpoints, store, limit, offset)


def _delete(store: JobStore, settings: Settings, run_id: str, checkpoint_id: str) -> None:
    call = "delete_checkpoint"
    _run(store, call, run_id)
    path = f"{names.SCHEME}{run_id}/{checkpoint_id}"
    names.parse_path(call, path, "checkpoint_id")
    info = ts.checkpoint(store.client, run_id, path)
    if info is None:
        raise not_found(call, "checkpoint_id", f"no checkpoint {checkpoint_id[:100]!r} in run {run_id!r}")
    folder = Path(info.folder).resolve()
    if folder.is_relative_to((settings.base_path / TINKER).resolve()):  # never anything outside the service's own
        shutil.rmtree(folder, ignore_errors=True)
        if settings.store is not None:
            settings.store.delete_tree(folder)
    ts.remove_checkpoint(store.client, run_id, path)


@router.delete("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}")
async def delete_checkpoint(run_id: str, checkpoint_id: str, store: StoreDep, settings: SettingsDep) -> dict[str, Any]:
    if checkpoint_id.endswith("/publish"):
        raise unsupported("unpublish_checkpoint")
    await run_in_threadpool(_delete, store, settings, run_id, checkpoint_id)
    return {}


def checkpoint_folder(
    store: JobStore, settings: Settings, call: str, tinker_path: str
) -> tuple[ts.CheckpointInfo, Path]:
    """A checkpoint's record and its adapter folder on the volume (404 when either is gone)."""
    parsed = names.parse_path(call, tinker_path, "path")
    _run(store, call, parsed.run_id)
    info = ts.checkpoint(store.client, parsed.run_id, tinker_path)
    folder = Path(info.folder) if info is not None else None
    present = folder is not None and (folder.is_dir() if settings.store is None else settings.store.manifest(folder))
    if info is None or folder is None or not present:
        raise not_found(call, "path", f"no checkpoint {tinker_path[:200]!r} (deleted, or never saved)")
    return info, folder


@router.get(
    "/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/archive",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/gzip": {}}, "description": "the checkpoint's folder as a tar.gz"}},
)
def checkpoint_archive(run_id: str, checkpoint_id: str, store: StoreDep, settings: SettingsDep) -> StreamingResponse:
    """A checkpoint's adapter folder as a tar.gz (as a job's adapter downloads): the SDK has no call for it,
    `curl` does."""
    _info, folder = checkpoint_folder(store, settings, "checkpoint_archive", f"{names.SCHEME}{run_id}/{checkpoint_id}")
    filename = f"{run_id}-{checkpoint_id}".replace("/", "-").replace(":", "-")
    headers = {"Content-Disposition": f'attachment; filename="{filename}.tar.gz"'}
    stored = stored_folder(settings.store, folder) if settings.store is not None else None
    if settings.store is not None and stored is not None:  # streamed from the store, object by object
        return StreamingResponse(iter_stored_tar_gz(settings.store, folder, stored), media_type="application/gzip",
                                 headers=headers)  # fmt: skip
    return StreamingResponse(iter_tar_gz(folder, list_files(folder)), media_type="application/gzip", headers=headers)


@router.api_route(
    "/training_runs/{run_id}/checkpoints/{checkpoint_id:path}", methods=["GET", "POST", "PUT"], include_in_schema=False
)
async def checkpoint_extras(run_id: str, checkpoint_id: str) -> None:
    """publish, ttl, external_weights_urls: not implemented here."""
    action = checkpoint_id.rsplit("/", 1)[-1]
    raise unsupported(f"checkpoint {action}" if action in ("publish", "ttl", "external_weights_urls") else "this call")


def _runs(store: JobStore, limit: int, offset: int) -> dict[str, Any]:
    ids = list(reversed(ts.model_ids(store.client)))  # newest first
    runs = []
    for model_id in ids[offset : offset + limit]:
        model = ts.get_model(store.client, model_id)
        if model is not None:
            runs.append(_run_json(store, model))
    return {"training_runs": runs, "cursor": {"offset": offset, "limit": limit, "total_count": len(ids)}}


@router.get("/training_runs")
async def list_training_runs(store: StoreDep, limit: int = 20, offset: int = 0) -> dict[str, Any]:
    limit, offset = _page(limit, offset)
    return await run_in_threadpool(_runs, store, limit, offset)


def _one_run(store: JobStore, run_id: str) -> dict[str, Any]:
    return _run_json(store, _run(store, "get_training_run", run_id))


@router.get("/training_runs/{run_id}")
async def get_training_run(run_id: str, store: StoreDep) -> dict[str, Any]:
    return await run_in_threadpool(_one_run, store, run_id)


def _weights_info(store: JobStore, raw_path: str) -> dict[str, Any]:
    call = "weights_info"
    path = names.parse_path(call, raw_path, "tinker_path")
    model = ts.get_model(store.client, path.run_id)
    if model is None or ts.checkpoint(store.client, path.run_id, str(path)) is None:
        raise bad_request(call, "tinker_path", f"no checkpoint {str(path)!r} on this server")
    return {
        "base_model": model.base_model,
        "is_lora": True,
        "lora_rank": model.rank,
        "train_unembed": model.train_unembed,
        "train_mlp": model.train_mlp,
        "train_attn": model.train_attn,
        "optimizer_config": {"type": "adamw"},
    }


@router.post("/weights_info")
async def weights_info(request: Request, store: StoreDep, settings: SettingsDep) -> dict[str, Any]:
    body = await parse(request, WeightsInfo, "weights_info", settings)
    return await run_in_threadpool(_weights_info, store, body.tinker_path)
