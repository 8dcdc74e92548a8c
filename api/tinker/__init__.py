"""The Tinker-compatible API: every `/api/v1/...` route the `tinker` SDK (0.38) calls for training clients,
sampling clients and the RestClient (docs: README, "Tinker-compatible API")."""

from __future__ import annotations

from fastapi import FastAPI


def install(app: FastAPI) -> None:
    from api.tinker import checkpoints, errors, futures, sampling, service, training

    errors.install(app)
    for module in (service, training, futures, sampling, checkpoints):
        app.include_router(module.router)
