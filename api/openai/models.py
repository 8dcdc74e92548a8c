"""`/v1/models`: the base models in use, the fine-tuned models and their checkpoints (api.openai.catalog)."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from api.deps import SettingsDep, StoreDep
from api.openai.catalog import ServedModel, list_models, resolve
from api.openai.errors import OpenAIRoute
from api.openai.store import OpenAIStoreDep
from shared.models_api import ModelList, ModelPublic

router = APIRouter(prefix="/v1/models", tags=["openai"], route_class=OpenAIRoute)


def _public(model: ServedModel) -> ModelPublic:
    return ModelPublic(id=model.id, created=model.created, owned_by=model.owned_by)


@router.get("")
async def get_models(store: StoreDep, ostore: OpenAIStoreDep, settings: SettingsDep) -> ModelList:
    """Every model `/v1/chat/completions` answers with."""
    models = await run_in_threadpool(list_models, store, ostore, settings)
    return ModelList(data=[_public(m) for m in models])


# `:path`: base model names are hub ids ("Qwen/Qwen2.5-0.5B") or folders, both with slashes.
@router.get("/{model:path}", responses={404: {}})
async def get_model(model: str, store: StoreDep, ostore: OpenAIStoreDep, settings: SettingsDep) -> ModelPublic:
    return _public(await run_in_threadpool(resolve, store, ostore, settings, model))
