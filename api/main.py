"""The HTTP API: `uvicorn api.main:create_app --factory`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator

import anyio.to_thread
import redis
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.middleware.cors import CORSMiddleware

from api import tinker
from api.auth import ApiKeyMiddleware, listening_host
from api.error_responses import install_handlers
from api.incoming import sweep_and_report, sweep_periodically
from api.openai import chat as openai_chat
from api.openai import files as openai_files
from api.openai import jobs as openai_jobs
from api.openai import models as openai_models
from api.openai.generation import GenerationQueue, connect_async
from api.routes import artifacts, dashboard, health, jobs, merge, seed_merge, status, train
from api.webhooks.dispatcher import WebhookDispatcher
from api.webhooks.queue import WebhookQueue
from shared.addresses import is_loopback
from shared.celery_factory import make_celery
from shared.reaper import reap_once
from shared.settings import Settings, get_settings
from shared.store import JobStore, connect

log = logging.getLogger(__name__)


async def _reaper(app: FastAPI) -> None:
    """Fail or requeue jobs whose worker vanished, without waiting for anyone to call an endpoint."""
    settings: Settings = app.state.settings
    while True:
        try:
            await run_in_threadpool(reap_once, app.state.store, app.state.celery, settings)
        except redis.ConnectionError as exc:  # Redis down: keep trying, the API answers 503 meanwhile
            log.debug("reaper: %s", exc)
        except Exception:
            log.warning("reaper failed", exc_info=True)
        await asyncio.sleep(settings.reap_interval_s)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.base_path.mkdir(parents=True, exist_ok=True)
        sweep_and_report(settings)  # what an API killed mid-upload left in datasets/.incoming
        host = listening_host(sys.argv)
        if not settings.api_key and not is_loopback(host):
            log.warning("listening on %s without LORA_API_KEY: anyone who can reach it can train and cancel", host)
        # Sync handlers (Redis reads) run in worker threads; the default 40 would queue a crowd of pollers.
        anyio.to_thread.current_default_thread_limiter().total_tokens = 128
        app.state.store = JobStore(connect(settings.redis_url))
        app.state.celery = make_celery(settings)
        generation_client = connect_async(settings.redis_url)  # chat completions wait on Redis without a thread
        app.state.generation = GenerationQueue(generation_client, settings)
        # Always running: with no receiver configured it still empties the outbox the job transitions fill.
        dispatcher = WebhookDispatcher(WebhookQueue(app.state.store.client), settings)
        tasks = [
            asyncio.create_task(_reaper(app)),
            asyncio.create_task(dispatcher.run()),
            asyncio.create_task(sweep_periodically(settings)),
        ]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            app.state.store.client.close()
            await generation_client.aclose()

    app = FastAPI(
        title="lora-server",
        summary="LoRA fine-tuning as a job queue",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    install_handlers(app)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"], allow_headers=["*"]
        )
    routers = (train, status, jobs, merge, seed_merge, health, artifacts, dashboard)
    for module in (*routers, openai_files, openai_jobs, openai_models, openai_chat):
        app.include_router(module.router)
    tinker.install(app)
    return app
