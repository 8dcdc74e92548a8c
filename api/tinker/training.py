"""A Tinker training client's calls: create a model (or one from a checkpoint), then forward / forward_backward,
optim_step, save and load, each validated in full, queued for the model's host in seq_id order, and answered
with a future (`{"request_id", "model_id"}`) the client polls through retrieve_future."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery import Celery
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from api.deps import CeleryDep, SettingsDep, StoreDep
from api.tinker import hosting, names, validate
from api.tinker.bases import accepted_base, same_base, vocab_size
from api.tinker.errors import TinkerRefusal, bad_request, not_found
from api.tinker.schemas import (
    CreateModel,
    LoadWeights,
    ModelRef,
    OptimStep,
    SaveWeights,
    SaveWeightsForSampler,
    parse,
    read_body,
)
from api.tinker.wire import WireError, WireForward, decode_forward_backward
from shared import keys
from shared import tinker_store as ts
from shared.config import TrainConfig
from shared.settings import Settings
from shared.store import JobStore
from shared.tinker_ops import LoadOp, SaveOp, TinkerCall, TinkerOp
from shared.volume import ADAPTER_CONFIG

router = APIRouter(prefix="/api/v1", tags=["tinker"])


def max_rank() -> int:
    """The largest LoRA rank the service trains (TrainConfig.lora_rank's bound)."""
    for bound in TrainConfig.model_fields["lora_rank"].metadata:
        if hasattr(bound, "le"):
            return int(bound.le)
    return 1024


def _future(request_id: str, model_id: str) -> dict[str, Any]:
    return {"request_id": request_id, "model_id": model_id}


def label_future(store: JobStore, request_id: str, call: str) -> None:
    """Note which call a future answers (for the messages about it)."""
    store.client.hset(keys.tinker_future_key(request_id), "call", call)


# --------------------------------------------------------------------------- creating a model


def _open_session(store: JobStore, call: str, session_id: str) -> ts.TinkerSession:
    session = ts.get_session(store.client, session_id)
    if session is None:
        raise not_found(call, "session_id", f"no session {session_id[:100]!r}")
    if session.finished:
        raise bad_request(call, "session_id", f"session {session_id!r} has finished")
    return session


def _existing(store: JobStore, model_id: str) -> dict[str, Any] | None:
    """A create call sent again (the client's retry): the same future."""
    model = ts.get_model(store.client, model_id)
    if model is None or model.create_request_id is None:
        return None
    return _future(model.create_request_id, model_id)


def _host_new(store: JobStore, celery: Celery, settings: Settings, model: ts.TinkerModel, call: str) -> dict[str, Any]:
    request_id = str(uuid.uuid4())
    model.create_request_id = request_id
    ts.new_future(store.client, request_id, model.model_id)
    label_future(store, request_id, call)
    try:
        hosting.ensure_hosted(store, celery, settings, model, call)
    except BaseException:  # nothing of the model is left: the client's retry starts afresh
        store.client.delete(keys.tinker_model_key(model.model_id), keys.tinker_future_key(request_id))
        raise
    ts.add_session_model(store.client, model.session_id, model.model_id, model.created_ms)
    return _future(request_id, model.model_id)


def _create_model(store: JobStore, celery: Celery, settings: Settings, body: CreateModel) -> dict[str, Any]:
    call = "create_model"
    model_id = names.model_id(body.session_id, body.model_seq_id)
    again = _existing(store, model_id)
    if again is not None:
        return again
    _open_session(store, call, body.session_id)
    base = accepted_base(settings, body.base_model, call)
    lora = body.lora_config
    if not 1 <= lora.rank <= max_rank():
        raise bad_request(call, "lora_config.rank", f"{lora.rank} is outside 1..{max_rank()}")
    if not (lora.train_attn or lora.train_mlp or lora.train_unembed):
        raise bad_request(
            call, "lora_config", "train_attn, train_mlp and train_unembed are all false: nothing to train"
        )
    if lora.seed is not None and not 0 <= lora.seed <= 2**32 - 1:
        raise bad_request(call, "lora_config.seed", f"{lora.seed} is outside 0..2**32-1")
    kind = (body.optimizer_config or {}).get("type", "adamw")
    if kind != "adamw":
        raise bad_request(call, "optimizer_config.type", f"{kind!r} is not supported by this server (adamw is)")
    model = ts.TinkerModel(
        model_id=model_id,
        session_id=body.session_id,
        base_model=body.base_model,
        rank=lora.rank,
        seed=lora.seed if lora.seed is not None else 0,
        train_attn=lora.train_attn,
        train_mlp=lora.train_mlp,
        train_unembed=lora.train_unembed,
        vocab_size=vocab_size(base),
        user_metadata=body.user_metadata,
        created_ms=ts.now_ms(),
    )
    return _host_new(store, celery, settings, model, call)


@router.post("/create_model")
async def create_model(request: Request, store: StoreDep, celery: CeleryDep, settings: SettingsDep) -> dict[str, Any]:
    body = await parse(request, CreateModel, "create_model", settings)
    return await run_in_threadpool(_create_model, store, celery, settings, body)


def _model(store: JobStore, call: str, model_id: str) -> ts.TinkerModel:
    model = ts.get_model(store.client, model_id)
    if model is None:
        raise not_found(call, "model_id", f"no model {model_id[:100]!r}")
    return model


def _info(store: JobStore, model_id: str) -> dict[str, Any]:
    model = _model(store, "get_info", model_id)
    return {
        "model_id": model.model_id,
        "model_data": {"model_name": model.base_model, "tokenizer_id": model.base_model},
        "model_name": model.base_model,
        "is_lora": True,
        "lora_rank": model.rank,
        "optimizer_config": {"type": "adamw"},
        "type": "get_info",
    }


@router.post("/get_info")
async def get_info(request: Request, store: StoreDep, settings: SettingsDep) -> dict[str, Any]:
    body = await parse(request, ModelRef, "get_info", settings)
    return await run_in_threadpool(_info, store, body.model_id)


# --------------------------------------------------------------------------- queueing a call


def queue_call(
    store: JobStore, celery: Celery, settings: Settings, call: str, model: ts.TinkerModel, seq_id: int, op: TinkerOp
) -> dict[str, Any]:
    """Queue `op` as the model's call `seq_id` and answer its future (the same one for a call sent again)."""
    client, model_id = store.client, model.model_id
    if seq_id < 1:
        raise bad_request(call, "seq_id", f"{seq_id}: a training client's calls are numbered from 1")
    request_id = str(uuid.uuid4())
    earlier = ts.claim_seq_id(client, model_id, seq_id, request_id)
    if earlier is not None:
        return _future(earlier, model_id)
    if seq_id < ts.next_seq_id(client, model_id):
        ts.release_seq_id(client, model_id, seq_id, request_id)
        raise bad_request(call, "seq_id", f"{seq_id} was already run for model {model_id}")
    ts.push_call(client, TinkerCall(request_id=request_id, model_id=model_id, seq_id=seq_id, op=op), label=call)
    # No room for a new host now: the call stays queued, and its retrieve_future tries again (saying it waits).
    with contextlib.suppress(TinkerRefusal):
        hosting.rehost_if_idle(store, celery, settings, model_id, call)
    return _future(request_id, model_id)


def _callable_model(store: JobStore, call: str, model_id: str, seq_id: int | None) -> tuple[ts.TinkerModel, str | None]:
    """The model a call is for, and the future it already has when it was sent before (a retry); a 400/404 when
    the model takes no calls."""
    model = _model(store, call, model_id)
    if seq_id is not None:
        earlier = store.client.hget(keys.tinker_requests_key(model_id), str(seq_id))
        if earlier:
            return model, str(earlier)
    if model.closed:
        raise bad_request(call, "model_id", f"model {model_id} is closed: its session finished")
    hosting.refuse_if_lost(store, model, call)
    return model, None


# --------------------------------------------------------------------------- the hot path: forward_backward, optim_step

OFF_LOOP_BYTES = 256 * 1024  # a request this large is decoded and checked on a thread, not on the event loop


async def queue_hot(
    request: Request, store: JobStore, celery: Celery, settings: Settings, call: str, model_id: str, seq_id: int,
    make_op: Callable[[ts.TinkerModel], TinkerOp], *, heavy: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """`queue_call` for the calls of a training loop, on the event loop: the model and a retry's future in one
    round trip, the call queued in another (`shared.tinker_store.QUEUE_CALL`). Only the rare turns (a lost
    host, a model to host again) take a thread. `make_op` checks the call's content (on a thread when `heavy`)."""
    aclient = request.app.state.generation.client
    pipe = aclient.pipeline(transaction=False)
    pipe.get(keys.tinker_model_key(model_id))
    pipe.hget(keys.tinker_requests_key(model_id), str(seq_id))
    raw, earlier = await pipe.execute()
    if raw is None:
        raise not_found(call, "model_id", f"no model {model_id[:100]!r}")
    model = ts.TinkerModel.model_validate_json(raw)
    if earlier:
        return _future(str(earlier), model_id)
    if model.closed:
        raise bad_request(call, "model_id", f"model {model_id} is closed: its session finished")
    if seq_id < 1:
        raise bad_request(call, "seq_id", f"{seq_id}: a training client's calls are numbered from 1")
    op = await run_in_threadpool(make_op, model) if heavy else make_op(model)
    tinker_call = TinkerCall(request_id=str(uuid.uuid4()), model_id=model_id, seq_id=seq_id, op=op)
    reply = await ts.queue_call_async(aclient, tinker_call, call, model.job_id)
    if reply[0] == "earlier":  # sent again meanwhile: the first one's future
        return _future(reply[1], model_id)
    if reply[0] == "ran":
        raise bad_request(call, "seq_id", f"{seq_id} was already run for model {model_id}")
    if reply[0] == "lost":  # fails what is queued and answers the 400; a host found again meanwhile: queue as usual
        await run_in_threadpool(hosting.refuse_if_lost, store, model, call)
        return await run_in_threadpool(queue_call, store, celery, settings, call, model, seq_id, op)
    if model.job_id is None or reply[1] in ("", "succeeded"):  # its host went idle: host it again
        with contextlib.suppress(TinkerRefusal):  # no room now: the call waits, and retrieve_future tries again
            await run_in_threadpool(hosting.rehost_if_idle, store, celery, settings, model_id, call)
    return _future(tinker_call.request_id, model_id)


def _decode(body: bytes) -> WireForward:
    try:
        return decode_forward_backward(body)
    except WireError as exc:
        raise bad_request("forward_backward", "body", str(exc)) from exc


@router.post("/forward_backward")
async def forward_backward(
    request: Request, store: StoreDep, celery: CeleryDep, settings: SettingsDep
) -> dict[str, Any]:
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding not in ("", "identity"):
        raise bad_request(
            "forward_backward", "content-encoding", f"{encoding!r} is not supported (send it uncompressed)"
        )
    body = await read_body(request, "forward_backward", settings)
    heavy = len(body) > OFF_LOOP_BYTES
    wire = await run_in_threadpool(_decode, body) if heavy else _decode(body)
    call = "forward" if wire.forward_only else "forward_backward"
    return await queue_hot(request, store, celery, settings, call, wire.model_id, wire.seq_id,
                           lambda model: validate.forward_op(call, wire, model.vocab_size, settings),
                           heavy=heavy)  # fmt: skip


@router.post("/optim_step")
async def optim_step(request: Request, store: StoreDep, celery: CeleryDep, settings: SettingsDep) -> dict[str, Any]:
    body = await parse(request, OptimStep, "optim_step", settings)
    call = "optim_step"
    return await queue_hot(request, store, celery, settings, call, body.model_id, body.seq_id,
                           lambda _model: validate.optim_op(call, body.adam_params,
                                                            body.optimizer_params or body.optim_params))  # fmt: skip


def _check_free(store: JobStore, call: str, model: ts.TinkerModel, path: names.TinkerPath, folder: Path) -> None:
    if ts.checkpoint(store.client, model.model_id, str(path)) is not None or folder.exists():
        raise bad_request(call, "path", f"{path.name!r}: {path} already exists (send overwrite=true to replace it)")


def _save_weights(store: JobStore, celery: Celery, settings: Settings, body: SaveWeights) -> dict[str, Any]:
    call = "save_weights"
    model, earlier = _callable_model(store, call, body.model_id, body.seq_id)
    if earlier is not None:
        return _future(earlier, model.model_id)
    name = validate.checkpoint_name(call, body.path)
    path = names.TinkerPath(model.model_id, "weights", name)
    folder = settings.volume.tinker_model(model.model_id) / "weights" / name
    if not body.overwrite:
        _check_free(store, call, model, path, folder)
    op = SaveOp(op="save_weights", folder=str(folder), tinker_path=str(path), name=name)
    return queue_call(store, celery, settings, call, model, body.seq_id, op)


@router.post("/save_weights")
async def save_weights(request: Request, store: StoreDep, celery: CeleryDep, settings: SettingsDep) -> dict[str, Any]:
    body = await parse(request, SaveWeights, "save_weights", settings)
    return await run_in_threadpool(_save_weights, store, celery, settings, body)


def _save_for_sampler(
    store: JobStore, celery: Celery, settings: Settings, body: SaveWeightsForSampler
) -> dict[str, Any]:
    call = "save_weights_for_sampler"
    model, earlier = _callable_model(store, call, body.model_id, body.seq_id)
    if earlier is not None:
        return _future(earlier, model.model_id)
    sampling_session: str | None = None
    if body.path is not None:
        name = validate.checkpoint_name(call, body.path)
    elif body.sampling_session_seq_id is not None:
        name = f"ephemeral-{body.sampling_session_seq_id}"
        sampling_session = names.sampling_session_id(model.model_id, body.sampling_session_seq_id)
    else:
        raise bad_request(call, "path", "missing: a name, or sampling_session_seq_id for a sampling client")
    path = names.TinkerPath(model.model_id, "sampler_weights", name)
    folder = settings.volume.tinker_model(model.model_id) / "sampler_weights" / name
    if sampling_session is None and not body.overwrite:
        _check_free(store, call, model, path, folder)
    op = SaveOp(op="save_weights_for_sampler", folder=str(folder), tinker_path=str(path), name=name,
                sampling_session_id=sampling_session)  # fmt: skip
    answer = queue_call(store, celery, settings, call, model, body.seq_id, op)
    if sampling_session is not None:
        ts.add_session_sampler(store.client, model.session_id, sampling_session)
    return answer


@router.post("/save_weights_for_sampler")
async def save_weights_for_sampler(
    request: Request, store: StoreDep, celery: CeleryDep, settings: SettingsDep
) -> dict[str, Any]:
    body = await parse(request, SaveWeightsForSampler, "save_weights_for_sampler", settings)
    return await run_in_threadpool(_save_for_sampler, store, celery, settings, body)


# --------------------------------------------------------------------------- loading a checkpoint


def _adapter_source(settings: Settings, info: ts.CheckpointInfo) -> tuple[str, int] | None:
    """The base and rank a checkpoint folder's adapter_config.json names (for a checkpoint whose model is gone)."""
    try:
        config = json.loads((Path(info.folder) / ADAPTER_CONFIG).read_text())
        return str(config["base_model_name_or_path"]), int(config["r"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def source_checkpoint(
    store: JobStore, settings: Settings, call: str, raw_path: str, *, training: bool
) -> tuple[ts.CheckpointInfo, ts.TinkerModel | None, str, int]:
    """A checkpoint the service knows, its model (None when gone), base (the name its client gave) and rank."""
    path = names.parse_path(call, raw_path)
    info = ts.checkpoint(store.client, path.run_id, str(path))
    if info is None:
        raise bad_request(call, "path", f"no checkpoint {str(path)!r} on this server")
    if training and info.checkpoint_type != "training":
        raise bad_request(call, "path", f"{path} holds sampler weights only: load a weights/<name> checkpoint")
    source = ts.get_model(store.client, path.run_id)
    if source is not None:
        return info, source, source.base_model, source.rank
    described = _adapter_source(settings, info)
    if described is None:
        raise bad_request(call, "path", f"{path}: its model and its adapter_config.json are gone")
    return info, None, *described


def _load_into(store: JobStore, celery: Celery, settings: Settings, body: LoadWeights) -> dict[str, Any]:
    call = "load_weights"
    assert body.model_id is not None
    if body.seq_id is None:
        raise bad_request(call, "seq_id", "missing")
    model, earlier = _callable_model(store, call, body.model_id, body.seq_id)
    if earlier is not None:
        return _future(earlier, model.model_id)
    info, _, base, rank = source_checkpoint(store, settings, call, body.path, training=body.optimizer)
    if rank != model.rank or not same_base(settings, base, model.base_model):
        raise bad_request(call, "path", f"{info.tinker_path} is a rank-{rank} adapter of {base!r}; model "
                          f"{model.model_id} is rank {model.rank} on {model.base_model!r}")  # fmt: skip
    op = LoadOp(folder=info.folder, tinker_path=info.tinker_path, optimizer=body.optimizer)
    return queue_call(store, celery, settings, call, model, body.seq_id, op)


def _create_from_state(store: JobStore, celery: Celery, settings: Settings, body: LoadWeights) -> dict[str, Any]:
    call = "create_training_client_from_state"
    if body.session_id is None or body.model_seq_id is None:
        raise bad_request("load_weights", "model_id", "missing (or session_id and model_seq_id for a new model)")
    model_id = names.model_id(body.session_id, body.model_seq_id)
    again = _existing(store, model_id)
    if again is not None:
        return again
    _open_session(store, call, body.session_id)
    info, source, base_name, rank = source_checkpoint(store, settings, call, body.path, training=True)
    if body.base_model is not None and not same_base(settings, body.base_model, base_name):
        raise bad_request(
            call, "base_model", f"{body.base_model!r}, but {info.tinker_path} was trained on {base_name!r}"
        )
    base = accepted_base(settings, base_name, call)
    model = ts.TinkerModel(
        model_id=model_id,
        session_id=body.session_id,
        base_model=base_name,
        rank=rank,
        seed=source.seed if source else 0,
        train_attn=source.train_attn if source else True,
        train_mlp=source.train_mlp if source else True,
        train_unembed=source.train_unembed if source else True,
        vocab_size=source.vocab_size if source and source.vocab_size else vocab_size(base),
        user_metadata=body.user_metadata,
        created_ms=ts.now_ms(),
        load_from=info.folder,
        load_optimizer=body.optimizer,
    )
    return _host_new(store, celery, settings, model, call)


@router.post("/load_weights")
async def load_weights(request: Request, store: StoreDep, celery: CeleryDep, settings: SettingsDep) -> dict[str, Any]:
    body = await parse(request, LoadWeights, "load_weights", settings)
    if body.model_id is not None:
        return await run_in_threadpool(_load_into, store, celery, settings, body)
    return await run_in_threadpool(_create_from_state, store, celery, settings, body)
