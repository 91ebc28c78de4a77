"""Operations: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from controller.sidecar.routes.deps import ServiceDep

router = APIRouter(tags=["ops"])


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: a policy is loaded and the server is not draining",
            responses={503: {"description": "not ready"}})
async def readyz(service: ServiceDep) -> JSONResponse:
    snap = service.store.current
    if not service.ready:
        return JSONResponse({"status": "draining", "policy": snap.version}, status_code=503)
    return JSONResponse({"status": "ready", "policy": snap.version})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}}})
async def metrics(service: ServiceDep) -> Response:
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)
