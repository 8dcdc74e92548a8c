"""The generation worker: a long-lived process per worker host that answers chat completions and the
Tinker API's samples.

    python -m worker.generation [--name NAME]

Why a loop over a Redis list and not a Celery worker: the point of this process is to *keep* models
loaded between requests, which Celery's prefork pool works against (the training app recycles its
child after every task, and a generation app would need its own pool, queue and limits tuned the
opposite way); a request is seconds long, idempotent and worthless once its caller has given up, so
Celery's late acks and redelivery buy nothing, while the bound on waiting requests (429 past
LORA_GENERATION_MAX_PENDING) is one atomic check of the list's length (shared.generation_queue). So
the API pushes a `GenerationRequest` onto one list; every generation worker pops from it (BLPOP: each
request goes to exactly one), generates on its own device with its own model cache
(worker.generation.model_cache), and sends text back on the request's own Redis stream, which the API
reads as it grows, on whatever host it runs. A request whose deadline passed, or that the API
cancelled, is stopped between two tokens. A worker that dies mid-request loses only that request:
its caller gets a timeout.

Tinker samples (`shared.tinker_ops.SampleOp`, token ids in and out) come on their own list
(keys.TINKER_SAMPLE_QUEUE), popped in the same BLPOP as chat requests, and run on the same model cache
(worker.generation.token_sampling); the worker settles the sample's future in Redis
(shared.tinker_store) with the result or the error. A sample taken past its `deadline_ms` (Redis server
time) is failed without being run.

It is a separate process from the Celery training worker, so training is never slowed by it beyond
sharing the GPU, and training admission never waits on it. A heartbeat (LORA_GENERATORS in Redis)
lets the API answer 503 at once when no generation worker is running.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import redis
from pydantic import ValidationError

from shared import generation_queue as gq
from shared import keys, tinker_store
from shared.generation import GenerationFailed, GenerationRequest, TextDelta
from shared.object_store import StorageUnavailable
from shared.settings import Settings, get_settings
from shared.store import connect
from shared.tinker_ops import SampleOp
from worker import cpu_budget
from worker.quiet import disable_progress_bars

if TYPE_CHECKING:
    from worker.generation.model_cache import ModelCache

log = logging.getLogger("lora.generation")

POP_WAIT_S = 1.0  # how long one BLPOP waits, so a stop signal is noticed within about this
CANCEL_CHECK_S = 0.25  # how often the cancel flag is read while generating


def _heartbeat(settings: Settings, name: str, stop: threading.Event) -> None:
    client = connect(settings.redis_url)
    while not stop.is_set():
        try:
            gq.heartbeat(client, name)
        except redis.RedisError as exc:  # Redis down: keep trying until it returns
            log.debug("heartbeat: %s", exc)
        stop.wait(gq.HEARTBEAT_S)
    with contextlib.suppress(redis.RedisError):
        gq.forget(client, name)


def _on_this_host(request: GenerationRequest, settings: Settings) -> GenerationRequest:
    """The request's model and adapter folders as they lie under this host's base path, staged from the object
    store where there is one (FileNotFoundError when it lacks them; StorageUnavailable when it is down)."""
    from worker.jobs.staging import evict_staged, stage_folder

    volume, origin = settings.volume, request.volume_base
    base = (
        str(volume.localize(request.base_model, origin)) if request.base_model.startswith("/") else request.base_model
    )
    adapter = str(volume.localize(request.adapter_path, origin)) if request.adapter_path else None
    store = settings.store
    if store is not None:
        for folder in (base, adapter):
            if folder is not None and folder.startswith("/"):
                stage_folder(store, Path(folder))
        evict_staged(settings.base_path, int(settings.storage_cache_gb * 2**30))
    return request.model_copy(update={"base_model": base, "adapter_path": adapter})


def serve_one(client: redis.Redis, cache: ModelCache, request: GenerationRequest) -> None:
    """Generate one request's answer onto its output stream; every outcome ends the stream with one event."""
    from worker.generation.decoding import GenerationStopped, PromptError, generate
    from worker.generation.model_cache import ModelNotFoundError

    out = gq.OutputStream(client, request)
    deadline = gq.monotonic_deadline(client, request)
    checked = [0.0]

    def check_stop() -> None:
        now = time.monotonic()
        if now >= deadline:
            raise GenerationStopped("timeout", "the request's time limit (LORA_GENERATION_TIMEOUT_S) passed")
        if now - checked[0] >= CANCEL_CHECK_S:
            checked[0] = now
            if out.cancelled():
                raise GenerationStopped("cancelled", "the request was cancelled")

    try:
        check_stop()
        request = _on_this_host(request, get_settings())
        done = generate(cache, request, lambda text: out.send(TextDelta(text=text)), check_stop)
    except GenerationStopped as exc:
        log.info("request %s stopped: %s", request.id, exc)
        out.send(GenerationFailed(code=exc.code, message=str(exc)))  # type: ignore[arg-type]
        return
    except ModelNotFoundError as exc:
        out.send(GenerationFailed(code="model_not_found", message=str(exc)))
        return
    except PromptError as exc:
        out.send(GenerationFailed(code="invalid_request", message=str(exc)))
        return
    except (FileNotFoundError, StorageUnavailable) as exc:  # the adapter could not be staged from the store
        out.send(GenerationFailed(code="model_not_found", message=str(exc)))
        return
    except redis.RedisError:
        raise  # nowhere to report it: the caller times out
    except Exception as exc:  # out of memory, a model that cannot generate: this request fails, the worker goes on
        log.exception("request %s failed", request.id)
        out.send(GenerationFailed(code="generation_failed", message=f"{type(exc).__name__}: {exc}"))
        return
    out.send(done)


def serve_sample(client: redis.Redis, cache: ModelCache, op: SampleOp) -> None:
    """Sample one Tinker request and settle its future (shared.tinker_store) with the result or the error."""
    from worker.generation.model_cache import ModelNotFoundError, inference
    from worker.generation.token_sampling import SampleInputError, sample

    # The deadline is when the request stops being worth starting (the API's client has given up by then);
    # once started, a sample runs to its end: its result is still wanted.
    if op.deadline_ms:
        late_ms = int(gq.server_time(client) * 1000) - op.deadline_ms
        if late_ms > 0:
            log.info("sample %s expired %d ms before it was taken", op.request_id, late_ms)
            tinker_store.fail(client, op.request_id, f"the sample request expired: its deadline passed {late_ms} ms "
                              "before a generation worker was free to run it", "server")  # fmt: skip
            return

    try:
        adapter_dir = op.adapter_dir
        settings = get_settings()
        if adapter_dir is not None:  # the API's name for it; staged from the object store where there is one
            local = settings.volume.localize(adapter_dir, op.volume_base)
            if settings.store is not None:
                from worker.jobs.staging import stage_folder

                stage_folder(settings.store, local)
            adapter_dir = str(local)
        base, adapter = cache.get(op.model_dir, adapter_dir)
        with inference(), base.use(adapter):
            result = sample(base.model, base.tokenizer, op, cache_arg=base.cache_arg)
    except SampleInputError as exc:
        tinker_store.fail(client, op.request_id, str(exc), "user")
        return
    except (ModelNotFoundError, FileNotFoundError, StorageUnavailable) as exc:
        tinker_store.fail(client, op.request_id, str(exc), "server")
        return
    except redis.RedisError:
        raise  # nowhere to report it: the caller's future stays pending until the API gives up on it
    except Exception as exc:  # out of memory, a model that cannot generate: this request fails, the worker goes on
        log.exception("sample %s failed", op.request_id)
        tinker_store.fail(client, op.request_id, f"sampling failed: {type(exc).__name__}: {exc}", "server")
        return
    tinker_store.complete(client, op.request_id, result)


Work = GenerationRequest | SampleOp


def pop_work(client: redis.Redis, timeout_s: float, sample_first: bool) -> Work | None:
    """The next chat completion or Tinker sample, waiting up to `timeout_s` for either (one BLPOP).

    BLPOP takes from the first non-empty list it is given, so the caller alternates `sample_first`:
    a steady stream of one kind never starves the other.
    """
    queues = [keys.TINKER_SAMPLE_QUEUE, keys.GENERATE_QUEUE]
    item = cast(tuple[str, str] | None, client.blpop(queues if sample_first else queues[::-1], timeout=timeout_s))
    if item is None:
        return None
    queue, raw = item
    try:
        if queue == keys.TINKER_SAMPLE_QUEUE:
            return SampleOp.model_validate_json(raw)
        return GenerationRequest.model_validate_json(raw)
    except ValidationError as exc:  # not ours, or from an incompatible version: nobody can answer it
        log.error("dropping an unreadable request from %s: %s", queue, exc)
        with contextlib.suppress(Exception):  # a sample whose id can be read still gets its future failed
            request_id = json.loads(raw)["request_id"]
            tinker_store.fail(client, str(request_id), f"unreadable sample request: {exc}", "server")
        return None


def run(settings: Settings, name: str, stop: threading.Event) -> None:
    threading.Thread(target=_heartbeat, args=(settings, name, stop), name="lora-generation-heartbeat",
                     daemon=True).start()  # fmt: skip
    from worker.generation.model_cache import ModelCache, generation_device  # torch: loaded once the heartbeat runs

    cpu_budget.apply_to_torch()
    cache = ModelCache(
        max_bases=settings.generation_max_base_models,
        max_adapters=settings.generation_max_adapters,
        device=generation_device(settings.generation_device),
    )
    client = connect(settings.redis_url, timeout=POP_WAIT_S + 10)
    log.info("generation worker %s ready on %s", name, cache.device)
    sample_first = False
    while not stop.is_set():
        try:
            sample_first = not sample_first
            work = pop_work(client, POP_WAIT_S, sample_first)
            if isinstance(work, SampleOp):
                serve_sample(client, cache, work)
            elif work is not None:
                serve_one(client, cache, work)
        except redis.RedisError as exc:
            log.warning("Redis: %s; retrying", exc)
            stop.wait(1.0)


def _reported_lately(settings: Settings, name: str) -> bool:
    return gq.reported_lately(connect(settings.redis_url), name)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m worker.generation", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--name", default=None, help="name it reports (default: LORA_WORKER_NAME-generate, or host:pid)"
    )
    parser.add_argument("--check", action="store_true", help="exit 0 if the worker of this name reported lately")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    settings = get_settings()
    if settings.worker_name:
        name = args.name or f"{settings.worker_name}-generate"
    else:
        name = args.name or f"{socket.gethostname()}-generate:{os.getpid()}"
    if args.check:  # a container healthcheck
        raise SystemExit(0 if _reported_lately(settings, name) else 1)
    cpu_budget.configure(settings)  # before torch loads
    disable_progress_bars()  # its log is a file, not a terminal (worker.quiet)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    run(settings, name, stop)
    log.info("generation worker %s stopped", name)
