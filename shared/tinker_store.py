"""The Tinker-compatible API's state in Redis, both sides of it: futures, training models and their queued
calls, checkpoints.

A call the API accepts gets a future (pending) and goes on its model's call list; the worker hosting the
model runs it and settles the future with its result or its error. Futures outlive an API restart (they
are in Redis), and a future whose model's host is gone is failed by whoever reads it (`api.tinker`).
"""

from __future__ import annotations

import json
import time
from typing import Literal

import redis
import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, TypeAdapter

from shared import keys
from shared.tinker_ops import TinkerCall, TinkerResult

FUTURE_TTL_S = 7 * 24 * 3600  # a settled (or never settled) future is kept this long for the client to read
FutureState = Literal["pending", "done", "failed"]
ErrorCategory = Literal["user", "server", "unknown"]
_RESULT = TypeAdapter(TinkerResult)


class Future(BaseModel):
    model_config = ConfigDict(extra="ignore")

    request_id: str
    model_id: str | None = None
    state: FutureState = "pending"
    result: TinkerResult | None = None
    error: str | None = None
    category: ErrorCategory = "unknown"
    created_ms: int = 0


class TinkerModel(BaseModel):
    """A training model (one `create_lora_training_client`): hosted by the job of the same id."""

    model_config = ConfigDict(extra="ignore")

    model_id: str
    session_id: str
    base_model: str  # the name the client gave
    rank: int
    seed: int = 0
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True
    vocab_size: int | None = None  # read from the base's config.json at creation (token ids are checked against it)
    user_metadata: dict[str, str] | None = None
    created_ms: int = 0
    # The job hosting the model now (a job of kind "tinker"). A host that went idle saved the model's state
    # and ended its job; the next call starts a new hosting job (api.tinker), which loads `load_from`.
    job_id: str | None = None
    create_request_id: str | None = None  # the create_model / load_weights future the first host settles
    load_from: str | None = None  # a checkpoint folder the next host loads before running calls
    load_optimizer: bool = False  # ... with its optimizer state
    closed: bool = False  # its session finished: no more calls are taken


class CheckpointInfo(BaseModel):
    model_config = ConfigDict(extra="ignore")

    tinker_path: str  # tinker://<model_id>/weights/<name> or .../sampler_weights/<name>
    checkpoint_type: Literal["training", "sampler"]
    name: str
    folder: str  # the adapter folder on the volume
    created_ms: int
    size_bytes: int | None = None


class SamplingSession(BaseModel):
    """What a sampling client samples from: a base, and the sampler weights' adapter folder when it has one."""

    model_config = ConfigDict(extra="ignore")

    sampling_session_id: str
    session_id: str
    base_model: str  # the name the client gave (get_info's model_name)
    model_dir: str  # the base as the generation worker loads it
    adapter_dir: str | None = None
    model_path: str | None = None  # tinker://... of the sampler weights
    created_ms: int = 0


def save_sampling_session(client: redis.Redis, session: SamplingSession) -> None:
    client.set(keys.tinker_sampler_key(session.sampling_session_id), session.model_dump_json())


def get_sampling_session(client: redis.Redis, sampling_session_id: str) -> SamplingSession | None:
    raw = client.get(keys.tinker_sampler_key(sampling_session_id))
    return SamplingSession.model_validate_json(raw) if raw else None  # type: ignore[arg-type]


class HostInfo(BaseModel):
    """A running hosting job: its base, its clients and how many it takes (what the API places new clients by)."""

    model_config = ConfigDict(extra="ignore")

    job_id: str
    model_dir: str
    clients: list[str]
    capacity: int

    @property
    def has_room(self) -> bool:
        return len(self.clients) < self.capacity


def save_host(client: redis.Redis, host: HostInfo) -> None:
    client.hset(keys.TINKER_HOSTS, host.job_id, host.model_dump_json())


def drop_host(client: redis.Redis, job_id: str) -> None:
    client.hdel(keys.TINKER_HOSTS, job_id)


def hosts(client: redis.Redis) -> list[HostInfo]:
    raw = client.hgetall(keys.TINKER_HOSTS)
    return [HostInfo.model_validate_json(v) for v in raw.values()]  # type: ignore[union-attr]


def now_ms() -> int:
    return int(time.time() * 1000)


def new_future(client: redis.Redis, request_id: str, model_id: str | None) -> None:
    key = keys.tinker_future_key(request_id)
    client.hset(key, mapping={"request_id": request_id, "model_id": model_id or "", "state": "pending",
                              "created_ms": now_ms()})  # fmt: skip
    client.expire(key, FUTURE_TTL_S)


SETTLED_SIGNAL_TTL_S = 60  # a settled signal nobody waited for goes after this


def _settle(client: redis.Redis, request_id: str, fields: dict[str, str], ran: tuple[str, int] | None) -> None:
    """Write the outcome, then signal it on the future's own list, which a waiting `retrieve_future` pops
    (BLPOP: it wakes at once, and a signal sent before it started waiting is still there for it). `ran`: the
    model and seq_id of the call this settles, its model's next seq_id moved past it in the same round trip."""
    key = keys.tinker_future_key(request_id)
    signal = keys.tinker_settled_key(request_id)
    pipe = client.pipeline()
    pipe.hset(key, mapping=fields)  # type: ignore[arg-type]  # redis-py types the mapping invariantly
    pipe.expire(key, FUTURE_TTL_S)
    if ran is not None:
        pipe.set(keys.tinker_seq_key(ran[0]), ran[1] + 1)
    pipe.rpush(signal, "1")
    pipe.expire(signal, SETTLED_SIGNAL_TTL_S)
    pipe.execute()


def complete(client: redis.Redis, request_id: str, result: BaseModel, ran: tuple[str, int] | None = None) -> None:
    _settle(client, request_id, {"state": "done", "result": result.model_dump_json()}, ran)


def fail(
    client: redis.Redis,
    request_id: str,
    error: str,
    category: ErrorCategory = "server",
    ran: tuple[str, int] | None = None,
) -> None:
    _settle(client, request_id, {"state": "failed", "error": error, "category": category}, ran)


def read_future(fields: dict[str, str]) -> Future | None:
    """A future from its hash's fields (None for an unknown request id)."""
    if not fields:
        return None
    result = _RESULT.validate_json(fields["result"]) if fields.get("result") else None
    return Future(
        request_id=fields.get("request_id", ""),
        model_id=fields.get("model_id") or None,
        state=fields.get("state", "pending"),  # type: ignore[arg-type]
        result=result,
        error=fields.get("error"),
        category=fields.get("category", "unknown"),  # type: ignore[arg-type]
        created_ms=int(fields.get("created_ms", 0) or 0),
    )


def get_future(client: redis.Redis, request_id: str) -> Future | None:
    return read_future(client.hgetall(keys.tinker_future_key(request_id)))  # type: ignore[arg-type]


def save_model(client: redis.Redis, model: TinkerModel) -> None:
    client.set(keys.tinker_model_key(model.model_id), model.model_dump_json())


def get_model(client: redis.Redis, model_id: str) -> TinkerModel | None:
    raw = client.get(keys.tinker_model_key(model_id))
    return TinkerModel.model_validate_json(raw) if raw else None  # type: ignore[arg-type]


def next_seq_id(client: redis.Redis, model_id: str) -> int:
    """The seq_id the model's host runs next (calls before it have run); 1 for a new model."""
    raw = client.get(keys.tinker_seq_key(model_id))
    return int(raw) if raw else 1  # type: ignore[arg-type]


def push_call(client: redis.Redis, call: TinkerCall, label: str | None = None) -> None:
    """Queue `call` for its model's host, its future pending (one transaction: never a call without a future).
    `label`: the call's name, for the messages about its future."""
    pipe = client.pipeline()
    key = keys.tinker_future_key(call.request_id)
    fields: dict[str, str | int] = {"request_id": call.request_id, "model_id": call.model_id, "state": "pending",
                                    "created_ms": now_ms()}  # fmt: skip
    if label is not None:
        fields["call"] = label
    pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
    pipe.expire(key, FUTURE_TTL_S)
    pipe.rpush(keys.tinker_calls_key(call.model_id), call.model_dump_json())
    pipe.execute()


# One accepted call, in one step inside Redis (the API's hot path: a training loop sends two calls a step).
# KEYS: the model's requests hash, its next-seq key, its call list, the future's hash, its hosting job's hash
# (a key without a status when it has none). ARGV: seq_id, request_id, the call's JSON, the future's fields' values
# (created_ms, label), the future's TTL.
# Returns {"earlier", request_id} (the seq_id was sent before: its future), {"ran"} (a seq_id already run),
# {"lost"} (the hosting job failed or was cancelled: nothing queued) or {"queued", the hosting job's status}.
QUEUE_CALL = """
local seq = ARGV[1]
local earlier = redis.call('HGET', KEYS[1], seq)
if earlier then return {'earlier', earlier} end
local status = redis.call('HGET', KEYS[5], 'status') or ''
if status == 'failed' or status == 'cancelled' then return {'lost'} end
local next_seq = tonumber(redis.call('GET', KEYS[2]) or '1')
if tonumber(seq) < next_seq then return {'ran'} end
redis.call('HSET', KEYS[1], seq, ARGV[2])
redis.call('HSET', KEYS[4], 'request_id', ARGV[2], 'model_id', ARGV[6], 'state', 'pending', 'created_ms', ARGV[4],
  'call', ARGV[5])
redis.call('EXPIRE', KEYS[4], tonumber(ARGV[7]))
redis.call('RPUSH', KEYS[3], ARGV[3])
return {'queued', status}
"""


async def queue_call_async(client: aioredis.Redis, call: TinkerCall, label: str, job_id: str | None) -> list[str]:
    """Queue `call` for its model's host unless its seq_id was sent before, already ran, or its host was lost
    (`QUEUE_CALL`: what it returns). For the API's event loop: one round trip, no thread."""
    model_id = call.model_id
    future_key = keys.tinker_future_key(call.request_id)
    job_key = keys.job_key(job_id) if job_id else future_key  # no job: a key with no status yet
    argv: list[str | int] = [
        call.seq_id,
        call.request_id,
        call.model_dump_json(),
        now_ms(),
        label,
        model_id,
        FUTURE_TTL_S,
    ]
    script = client.register_script(QUEUE_CALL)
    reply = await script(
        keys=[keys.tinker_requests_key(model_id), keys.tinker_seq_key(model_id), keys.tinker_calls_key(model_id),
              future_key, job_key],
        args=argv,
    )  # fmt: skip
    return [str(part) for part in reply]


def pop_call(client: redis.Redis, model_id: str, timeout_s: float) -> TinkerCall | None:
    reply = client.blpop([keys.tinker_calls_key(model_id)], timeout=timeout_s)
    if reply is None:
        return None
    return TinkerCall.model_validate_json(reply[1])  # type: ignore[index]


def pending_calls(client: redis.Redis, model_id: str) -> list[TinkerCall]:
    """The calls still queued for a model (not yet taken by a host)."""
    raw = client.lrange(keys.tinker_calls_key(model_id), 0, -1)
    return [TinkerCall.model_validate_json(item) for item in raw]  # type: ignore[union-attr]


def drop_calls(client: redis.Redis, model_id: str) -> list[TinkerCall]:
    """Take every queued call off a model's list (its host is gone: the caller fails their futures)."""
    pipe = client.pipeline()
    pipe.lrange(keys.tinker_calls_key(model_id), 0, -1)
    pipe.delete(keys.tinker_calls_key(model_id))
    raw, _ = pipe.execute()
    return [TinkerCall.model_validate_json(item) for item in raw]


def add_checkpoint(client: redis.Redis, model_id: str, info: CheckpointInfo) -> None:
    client.hset(keys.tinker_checkpoints_key(model_id), info.tinker_path, info.model_dump_json())


def checkpoints(client: redis.Redis, model_id: str) -> list[CheckpointInfo]:
    raw = client.hgetall(keys.tinker_checkpoints_key(model_id))
    found = [CheckpointInfo.model_validate_json(v) for v in raw.values()]  # type: ignore[union-attr]
    return sorted(found, key=lambda c: c.created_ms)


def checkpoint(client: redis.Redis, model_id: str, tinker_path: str) -> CheckpointInfo | None:
    raw = client.hget(keys.tinker_checkpoints_key(model_id), tinker_path)
    return CheckpointInfo.model_validate_json(raw) if raw else None  # type: ignore[arg-type]


def remove_checkpoint(client: redis.Redis, model_id: str, tinker_path: str) -> None:
    client.hdel(keys.tinker_checkpoints_key(model_id), tinker_path)


class TinkerSession(BaseModel):
    """A client session (one ServiceClient): what it created, and whether it ended."""

    model_config = ConfigDict(extra="ignore")

    session_id: str
    created_ms: int = 0
    tags: list[str] = []
    user_metadata: dict[str, str] | None = None
    finished: bool = False


def save_session(client: redis.Redis, session: TinkerSession) -> None:
    pipe = client.pipeline()
    pipe.hset(keys.tinker_session_key(session.session_id), mapping={
        "session_id": session.session_id, "created_ms": session.created_ms, "tags": dumps(session.tags),
        "user_metadata": dumps(session.user_metadata), "finished": "1" if session.finished else "0"})  # fmt: skip
    pipe.zadd(keys.TINKER_SESSIONS, {session.session_id: now_ms()})
    pipe.execute()


def get_session(client: redis.Redis, session_id: str) -> TinkerSession | None:
    fields: dict[str, str] = client.hgetall(keys.tinker_session_key(session_id))  # type: ignore[assignment]
    if not fields.get("session_id"):
        return None
    return TinkerSession(
        session_id=fields["session_id"],
        created_ms=int(fields.get("created_ms") or 0),
        tags=json.loads(fields.get("tags") or "[]"),
        user_metadata=json.loads(fields.get("user_metadata") or "null"),
        finished=fields.get("finished") == "1",
    )


def touch_session(client: redis.Redis, session_id: str) -> None:
    """A heartbeat: the session's last sign of life (the score in keys.TINKER_SESSIONS)."""
    client.zadd(keys.TINKER_SESSIONS, {session_id: now_ms()})


def finish_session(client: redis.Redis, session_id: str) -> None:
    client.hset(keys.tinker_session_key(session_id), "finished", "1")


def add_session_model(client: redis.Redis, session_id: str, model_id: str, created_ms: int) -> None:
    pipe = client.pipeline()
    pipe.sadd(keys.tinker_session_models_key(session_id), model_id)
    pipe.zadd(keys.TINKER_MODELS, {model_id: created_ms})
    pipe.execute()


def session_models(client: redis.Redis, session_id: str) -> list[str]:
    return sorted(client.smembers(keys.tinker_session_models_key(session_id)))  # type: ignore[arg-type]


def add_session_sampler(client: redis.Redis, session_id: str, sampling_session_id: str) -> None:
    client.sadd(keys.tinker_session_samplers_key(session_id), sampling_session_id)


def session_samplers(client: redis.Redis, session_id: str) -> list[str]:
    return sorted(client.smembers(keys.tinker_session_samplers_key(session_id)))  # type: ignore[arg-type]


def model_ids(client: redis.Redis) -> list[str]:
    """Every training model, oldest first."""
    return list(client.zrange(keys.TINKER_MODELS, 0, -1))  # type: ignore[arg-type]


def claim_seq_id(client: redis.Redis, model_id: str, seq_id: int, request_id: str) -> str | None:
    """Note `request_id` as the call `seq_id` of a model; None when it is new, else the request id the same
    seq_id already has (a client re-sending a call it got no answer for gets the same future)."""
    key = keys.tinker_requests_key(model_id)
    if client.hsetnx(key, str(seq_id), request_id):
        return None
    return client.hget(key, str(seq_id))  # type: ignore[return-value]


def release_seq_id(client: redis.Redis, model_id: str, seq_id: int, request_id: str) -> None:
    """Forget a claimed seq_id whose call was not queued after all (only if it is still `request_id`'s)."""
    key = keys.tinker_requests_key(model_id)
    if client.hget(key, str(seq_id)) == request_id:
        client.hdel(key, str(seq_id))


def dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))
