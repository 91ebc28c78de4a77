"""``GET /v1/policy`` (what is serving) and ``PUT /v1/policy`` (authenticated hot reload)."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request

from controller.artifact import ArtifactError
from controller.sidecar.routes.deps import ServiceDep, TokenDep
from controller.sidecar.schemas import ENGINE_ID_PATTERN, PolicyInfo

router = APIRouter(prefix="/v1", tags=["policy"])


@router.get("/policy", response_model=PolicyInfo, summary="The serving policy and its table now",
            responses={404: {"description": "engine_id has not called POST /v1/decide"}})
async def get_policy(service: ServiceDep,
                     engine_id: Annotated[str | None, Query(pattern=ENGINE_ID_PATTERN,
                                                            description="table at this engine's state")] = None
                     ) -> dict[str, Any]:
    """Version, provenance, evaluation summary and the table by batch size, at ``engine_id``'s
    current state (or a fresh state)."""
    try:
        return service.policy_info(engine_id)
    except KeyError:
        raise HTTPException(404, detail=f"engine {engine_id!r} has not called POST /v1/decide yet") from None


ARTIFACT_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "description": "a spec-policy/1 artifact (the policy JSON file's content)",
    "required": ["schema", "feature_spec", "actions", "weights", "biases"]}}}}}


@router.put("/policy", summary="Hot-swap the policy (authenticated)", openapi_extra=ARTIFACT_BODY,
            responses={401: {"description": "missing or wrong bearer token"},
                       422: {"description": "the artifact is refused (the old policy keeps serving)"}})
async def put_policy(request: Request, service: ServiceDep, _auth: TokenDep) -> dict[str, Any]:
    """Check the artifact completely (schema, shapes, a forward pass), swap it in atomically and
    write it to the policy file.  A refused artifact changes nothing."""
    keep = f"policy refused, version {service.store.current.version} keeps serving"
    try:
        artifact = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as exc:
        raise HTTPException(422, detail=f"{keep}: the body is not JSON ({exc})") from None
    if not isinstance(artifact, dict):
        raise HTTPException(422, detail=f"{keep}: expected a JSON object, found {type(artifact).__name__}")
    try:
        snap, persisted = await service.put_policy(artifact)
    except ArtifactError as exc:
        raise HTTPException(422, detail=f"{keep}: {exc}") from None
    return {"version": snap.version, "sha256": snap.sha256, "persisted": persisted}


@router.get("/engines", summary="Engines seen, newest last")
async def get_engines(service: ServiceDep) -> list[dict[str, Any]]:
    return service.engines.summary()
