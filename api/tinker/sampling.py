"""A Tinker sampling client: sampling sessions (a base, and sampler weights when it has them) and `asample`,
which validates the request and queues a SampleOp for the generation workers (keys.TINKER_SAMPLE_QUEUE,
bounded by LORA_TINKER_SAMPLE_MAX_PENDING), answering a future the client polls."""

from __future__ import annotations

import math
import uuid
from typing import Any

import redis
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from api.deps import SettingsDep, StoreDep
from api.tinker import names
from api.tinker.bases import accepted_base, vocab_size
from api.tinker.errors import bad_request, busy, not_found, unavailable
from api.tinker.schemas import CreateSamplingSession, Sample, parse
from api.tinker.validate import MAX_SAMPLES, check_tokens
from shared import generation_queue as gq
from shared import keys
from shared import tinker_store as ts
from shared.settings import Settings
from shared.store import JobStore
from shared.tinker_ops import SampleOp

router = APIRouter(prefix="/api/v1", tags=["tinker"])


def _session_of_path(store: JobStore, settings: Settings, call: str, model_path: str) -> tuple[str, str, str]:
    """The base (as its client named it), the adapter folder, and the path of sampler or training weights."""
    path = names.parse_path(call, model_path, "model_path")
    info = ts.checkpoint(store.client, path.run_id, str(path))
    model = ts.get_model(store.client, path.run_id)
    if info is None or model is None:
        raise bad_request(call, "model_path", f"no checkpoint {str(path)!r} on this server")
    return model.base_model, info.folder, str(path)


def _target(
    store: JobStore,
    settings: Settings,
    call: str,
    model_path: str | None,
    base_model: str | None,
    missing: tuple[str, str],
) -> tuple[str, str, str | None, str | None]:
    """What to sample from: (the base's name, what a worker loads for it, the adapter folder, the tinker path),
    from a tinker:// path or a base model's name; a 400 on `missing` (field, reason) when neither is given."""
    adapter: str | None = None
    if model_path is not None:
        base_name, adapter, model_path = _session_of_path(store, settings, call, model_path)
    elif base_model is not None:
        base_name = base_model
    else:
        raise bad_request(call, *missing)
    return base_name, accepted_base(settings, base_name, call).location, adapter, model_path


def _create(store: JobStore, settings: Settings, body: CreateSamplingSession) -> dict[str, Any]:
    call = "create_sampling_session"
    session = ts.get_session(store.client, body.session_id)
    if session is None:
        raise not_found(call, "session_id", f"no session {body.session_id[:100]!r}")
    base_name, location, adapter, model_path = _target(
        store,
        settings,
        call,
        body.model_path,
        body.base_model,
        ("model_path", "missing: a tinker:// path, or base_model"),
    )
    sampler_id = names.sampling_session_id(body.session_id, body.sampling_session_seq_id)
    ts.save_sampling_session(store.client, ts.SamplingSession(
        sampling_session_id=sampler_id, session_id=body.session_id, base_model=base_name, model_dir=location,
        adapter_dir=adapter, model_path=model_path, created_ms=ts.now_ms()))  # fmt: skip
    ts.add_session_sampler(store.client, body.session_id, sampler_id)
    return {"sampling_session_id": sampler_id, "type": "create_sampling_session"}


@router.post("/create_sampling_session")
async def create_sampling_session(request: Request, store: StoreDep, settings: SettingsDep) -> dict[str, Any]:
    body = await parse(request, CreateSamplingSession, "create_sampling_session", settings)
    return await run_in_threadpool(_create, store, settings, body)


def _sampler(store: JobStore, sampler_id: str) -> dict[str, Any]:
    found = ts.get_sampling_session(store.client, sampler_id)
    if found is None:
        raise not_found("get_sampler", "sampler_id", f"no sampling session {sampler_id[:100]!r}")
    body: dict[str, Any] = {"sampler_id": found.sampling_session_id, "base_model": found.base_model}
    if found.model_path is not None:
        body["model_path"] = found.model_path
    return body


@router.get("/samplers/{sampler_id}")
async def get_sampler(sampler_id: str, store: StoreDep) -> dict[str, Any]:
    return await run_in_threadpool(_sampler, store, sampler_id)


# --------------------------------------------------------------------------- sampling


def _prompt_tokens(call: str, prompt: dict[str, Any]) -> list[int]:
    chunks = prompt.get("chunks")
    if not isinstance(chunks, list):
        raise bad_request(call, "prompt.chunks", "missing: a list of chunks")
    tokens: list[int] = []
    for i, chunk in enumerate(chunks):
        kind = chunk.get("type", "encoded_text") if isinstance(chunk, dict) else None
        if kind != "encoded_text":
            raise bad_request(call, f"prompt.chunks[{i}]", f"{kind!r} chunks are not supported (only encoded_text)")
        values = chunk.get("tokens")
        if not isinstance(values, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in values):
            raise bad_request(call, f"prompt.chunks[{i}].tokens", "must be a list of token ids")
        tokens.extend(values)
    if not tokens:
        raise bad_request(call, "prompt", "empty: a prompt needs at least one token")
    return tokens


def _number(call: str, params: dict[str, Any], name: str, default: float) -> float:
    value = params.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise bad_request(call, f"sampling_params.{name}", f"{value!r} is not a finite number")
    return float(value)


def _integer(call: str, params: dict[str, Any], name: str) -> int | None:
    value = params.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise bad_request(call, f"sampling_params.{name}", f"{value!r} is not an integer")
    return value


def sample_op(call: str, body: Sample, session: ts.SamplingSession, vocab: int | None, settings: Settings) -> SampleOp:
    for name, asked in (("topk_prompt_logprobs", body.topk_prompt_logprobs), ("topk_sample_logprobs", body.topk_sample_logprobs),
                        ("prompt_alt_tokens_k", body.prompt_alt_tokens_k)):  # fmt: skip
        if asked:
            raise bad_request(call, name, "not supported by this server")
    if body.target_prompt_logprobs is not None:
        raise bad_request(call, "target_prompt_logprobs", "not supported by this server")
    if body.prompt_logprobs_last_n is not None:
        raise bad_request(call, "prompt_logprobs_last_n", "not supported by this server (ask for all prompt_logprobs)")
    prompt = _prompt_tokens(call, body.prompt)
    check_tokens(call, "prompt.tokens", prompt, vocab)
    if not 1 <= body.num_samples <= MAX_SAMPLES:
        raise bad_request(call, "num_samples", f"{body.num_samples} is outside 1..{MAX_SAMPLES}")
    params = body.sampling_params
    limit = settings.generation_max_tokens
    max_tokens = _integer(call, params, "max_tokens")
    if max_tokens is not None and not 1 <= max_tokens <= limit:
        raise bad_request(call, "sampling_params.max_tokens",
                          f"{max_tokens} is outside 1..{limit} (LORA_GENERATION_MAX_TOKENS)")  # fmt: skip
    temperature = _number(call, params, "temperature", 1.0)
    if temperature < 0:
        raise bad_request(call, "sampling_params.temperature", f"{temperature} is negative")
    top_p = _number(call, params, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise bad_request(call, "sampling_params.top_p", f"{top_p} is outside (0, 1]")
    top_k = _integer(call, params, "top_k")
    if top_k is not None and top_k != -1 and top_k < 1:
        raise bad_request(call, "sampling_params.top_k", f"{top_k}: -1 (no limit) or at least 1")
    seed = _integer(call, params, "seed")
    if seed is not None and not 0 <= seed < 2**63:
        raise bad_request(call, "sampling_params.seed", f"{seed} is outside 0..2**63-1")
    stop = params.get("stop")
    strings: list[str] = []
    stop_tokens: list[int] = []
    if isinstance(stop, str):
        strings = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        strings = list(stop)
    elif isinstance(stop, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in stop):
        stop_tokens = list(stop)
        check_tokens(call, "sampling_params.stop", stop_tokens, vocab)
    elif stop is not None:
        raise bad_request(call, "sampling_params.stop", "a string, a list of strings or a list of token ids")
    if any(not s for s in strings):
        raise bad_request(call, "sampling_params.stop", "an empty stop string")
    return SampleOp(
        request_id=str(uuid.uuid4()),
        model_dir=session.model_dir,
        adapter_dir=session.adapter_dir,
        volume_base=str(settings.base_path.resolve()),
        prompt=prompt,
        num_samples=body.num_samples,
        max_tokens=max_tokens if max_tokens is not None else limit,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k if top_k is not None else -1,
        stop_strings=strings,
        stop_tokens=stop_tokens,
        stop_at_eos=stop is None or stop != [],
        seed=seed,
        prompt_logprobs=bool(body.prompt_logprobs),
    )


def _direct_session(store: JobStore, settings: Settings, call: str, body: Sample) -> ts.SamplingSession:
    """The session a sample names, or one made up for a request that names its base or weights itself."""
    if body.sampling_session_id is not None:
        found = ts.get_sampling_session(store.client, body.sampling_session_id)
        if found is None:
            raise not_found(call, "sampling_session_id", f"no sampling session {body.sampling_session_id[:100]!r}")
        return found
    base_name, location, adapter, model_path = _target(
        store, settings, call, body.model_path, body.base_model, ("sampling_session_id", "missing")
    )
    return ts.SamplingSession(sampling_session_id="", session_id="", base_model=base_name, model_dir=location,
                              adapter_dir=adapter, model_path=model_path)  # fmt: skip


def _vocab(settings: Settings, session: ts.SamplingSession) -> int | None:
    try:
        return vocab_size(accepted_base(settings, session.base_model, "sample"))
    except Exception:  # the base can no longer be checked here: the worker refuses what it cannot sample
        return None


def _sample(store: JobStore, settings: Settings, call: str, body: Sample) -> dict[str, Any]:
    session = _direct_session(store, settings, call, body)
    op = sample_op(call, body, session, _vocab(settings, session), settings)
    client: redis.Redis = store.client
    if not client.zcount(*gq.fresh_workers_call(gq.server_time(client))):
        raise unavailable(call, "no generation worker is running (start `python -m worker.generation` next to a "
                          "training worker; `lora-server` and docker compose start one)")  # fmt: skip
    ts.new_future(client, op.request_id, None)
    client.hset(keys.tinker_future_key(op.request_id), "call", call)
    enqueue = client.register_script(gq.ENQUEUE_SCRIPT)
    if not enqueue(keys=[keys.TINKER_SAMPLE_QUEUE], args=[settings.tinker_sample_max_pending, op.model_dump_json()]):
        client.delete(keys.tinker_future_key(op.request_id))
        raise busy(call, f"{settings.tinker_sample_max_pending} sampling requests already wait for a generation "
                   "worker (LORA_TINKER_SAMPLE_MAX_PENDING)", retry_after_s=1)  # fmt: skip
    return {"request_id": op.request_id, "sample_sequence_ids": [f"{op.request_id}:{i}" for i in range(op.num_samples)]}


@router.post("/asample")
async def asample(request: Request, store: StoreDep, settings: SettingsDep) -> dict[str, Any]:
    body = await parse(request, Sample, "sample", settings)
    return await run_in_threadpool(_sample, store, settings, "sample", body)


@router.post("/sample")
async def sample(request: Request, store: StoreDep, settings: SettingsDep) -> dict[str, Any]:
    body = await parse(request, Sample, "sample", settings)
    return await run_in_threadpool(_sample, store, settings, "sample", body)
