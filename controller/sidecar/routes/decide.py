"""``POST /v1/decide``: the engine's per-step call (ARCHITECTURE.md contract 6).

This route is called every engine step by every engine, so it is served by a small pure
ASGI fast path (:class:`DecideFastPath`, installed by :func:`controller.sidecar.app.create_app`)
that reads the body and calls :func:`handle` directly; the FastAPI route below calls the
same :func:`handle` and carries the OpenAPI documentation (and serves the path if the fast
path is not installed).  The body is parsed and validated in one pass by pydantic's JSON
parser; errors keep FastAPI's ``422 {"detail": [{"type", "loc", "msg"}]}`` shape.
Together this halves the per-request cost (bench/bench_sidecar.py).
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError

from controller.sidecar.schemas import DecideRequest, DecideResponse
from controller.sidecar.service import InvalidSteps, SidecarService

router = APIRouter(prefix="/v1", tags=["decide"])

PATH = "/v1/decide"
MAX_BODY = 16 << 20  # 16 MiB: far above max_steps_per_request records
BODY_SCHEMA = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/DecideRequest"}}}}}


def validation_detail(exc: ValidationError) -> list[dict]:
    """FastAPI's error items, without the offending input (it may not even be valid JSON: NaN)."""
    return [{"type": e["type"], "loc": ["body", *e["loc"]], "msg": e["msg"]} for e in exc.errors(include_url=False)]


def _error(detail) -> tuple[int, bytes]:
    return 422, json.dumps({"detail": detail}, separators=(",", ":")).encode()


def handle(service: SidecarService, raw: bytes) -> tuple[int, bytes]:
    """Status and JSON body for one decide call."""
    try:
        return 200, service.decide(DecideRequest.model_validate_json(raw))
    except ValidationError as exc:
        service.metrics.invalid_request()
        return _error(validation_detail(exc))
    except InvalidSteps as exc:
        service.metrics.invalid_request()
        return _error([{"type": "trace_invariant", "loc": exc.loc, "msg": exc.msg}])


@router.post(PATH.removeprefix("/v1"), response_model=DecideResponse,
             summary="Report finished steps, get the next decision", openapi_extra=BODY_SCHEMA,
             responses={422: {"description": "the body is not a DecideRequest, or a step breaks a spec-trace/1 "
                                             "invariant; `detail` names the field"}})
async def post_decide(request: Request) -> Response:
    """Fold the finished steps (oldest first) into this engine's feature state and return the
    decision table for its coming steps as runs ``[first_batch, last_batch, k, width]``.

    The engine looks up its batch size in the table at schedule time; this call runs in the
    engine's background thread, never on the step's critical path.
    """
    status, content = handle(request.app.state.service, await request.body())
    return Response(content, status_code=status, media_type="application/json")


class DecideFastPath:
    """Pure ASGI middleware answering ``POST /v1/decide`` without the framework's routing and
    dependency machinery; everything else goes on to the app."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY:
                await _send(send, 413, json.dumps({"detail": f"body over {MAX_BODY} bytes: send fewer steps "
                                                              f"per call"}).encode())
                return
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        status, content = handle(scope["app"].state.service, b"".join(chunks))
        await _send(send, status, content)


async def _send(send, status: int, content: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]})
    await send({"type": "http.response.body", "body": content})
