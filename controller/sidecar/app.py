"""Assembles the sidecar app: settings, service, routes, error handlers, lifespan.

    >>> from controller.artifact import PolicyArtifact
    >>> from controller.features import FeatureSpec
    >>> import tempfile, pathlib
    >>> p = PolicyArtifact.random(FeatureSpec(max_num_seqs=8, max_k=2), [(0, 1), (1, 1), (2, 1)]).save(
    ...     pathlib.Path(tempfile.mkdtemp()) / "policy.json")
    >>> app = create_app(SidecarSettings(policy=p))
    >>> sorted(app.openapi()["paths"])
    ['/healthz', '/metrics', '/readyz', '/v1/decide', '/v1/engines', '/v1/policy']
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from prometheus_client import CollectorRegistry

from controller.sidecar.metrics import SidecarMetrics
from controller.sidecar.routes import decide, ops, policy
from controller.sidecar.schemas import DecideRequest
from controller.sidecar.service import SidecarService
from controller.sidecar.settings import SidecarSettings

__all__ = ["create_app"]

log = logging.getLogger("controller.sidecar")

DESCRIPTION = """The decision service next to a vLLM server (ARCHITECTURE.md contract 6).

The engine posts each finished step's `spec-trace/1` record to `POST /v1/decide` from a
background thread and gets back the decision table by batch size; its step only looks the
table up.  `GET /v1/policy` shows what is serving; `PUT /v1/policy` hot-swaps it."""


def create_app(settings: SidecarSettings, registry: CollectorRegistry | None = None) -> FastAPI:
    """Build the app; the policy is loaded (and checked) here, so a bad one fails at start."""
    service = SidecarService(settings, SidecarMetrics(registry))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(service.watch(), name="policy-watch")
        try:
            yield
        finally:
            service.ready = False
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            service.close()

    app = FastAPI(title="spec-controller sidecar", version="1", description=DESCRIPTION, lifespan=lifespan)
    app.state.service = service
    app.add_middleware(decide.DecideFastPath)
    app.include_router(decide.router)
    app.include_router(policy.router)
    app.include_router(ops.router)

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            body = DecideRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            comps.update(body.pop("$defs", {}))
            comps["DecideRequest"] = body
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app
