"""Dependencies shared by the routes (``Annotated[..., Depends(...)]`` aliases)."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from controller.sidecar.service import SidecarService

_bearer = HTTPBearer(auto_error=False, description="required when the sidecar has a token "
                     "(always when bound beyond loopback)")


async def get_service(request: Request) -> SidecarService:  # async: a sync dependency costs a thread hop
    return request.app.state.service


ServiceDep = Annotated[SidecarService, Depends(get_service)]


async def require_token(service: ServiceDep,
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """Mutating endpoints: the bearer token must match when the sidecar has one."""
    token = service.settings.token
    if token is None:
        return
    if credentials is None or not hmac.compare_digest(credentials.credentials.encode(),
                                                      token.get_secret_value().encode()):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED,
                            detail="PUT /v1/policy needs `Authorization: Bearer <token>` with the sidecar's "
                                   "SPEC_SIDECAR_TOKEN", headers={"WWW-Authenticate": "Bearer"})


TokenDep = Annotated[None, Depends(require_token)]
