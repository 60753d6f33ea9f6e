"""FastAPI routes of the admin sidecar (OpenAPI at /openapi.json, docs at /docs).

Every route but /health needs ``Authorization: Bearer <token>``. Changes (upload, activate) are
audited. The operations themselves live in sidecar.py; this file only maps HTTP onto them.
"""

from __future__ import annotations

import json
from typing import Optional

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from sglang_kascade import __version__
from sglang_kascade.profile import PROFILE_JSON_SCHEMA

from . import metrics
from .auth import require_token
from .sidecar import Sidecar, SidecarSettings
from .store import StoreError

class ErrorBody(BaseModel):
    detail: str


class Health(BaseModel):
    status: str
    schedulers: int


class ProfileSummary(BaseModel):
    name: str
    source: str  # shipped | uploaded
    sha256: str
    anchor_layers: Optional[list[int]] = None
    topk_fraction: Optional[float] = None
    compatible: Optional[bool] = None  # with the served model; None while no scheduler is up
    problem: Optional[str] = None
    active: bool


class ProfileList(BaseModel):
    profiles: list[ProfileSummary]


class UploadResult(BaseModel):
    name: str
    sha256: str
    created: bool


class SchedulerView(BaseModel):
    pid: int
    current_name: Optional[str] = None
    current_sha256: Optional[str] = None
    current_generation: int
    applied_generation: Optional[int] = None
    staged_generation: Optional[int] = None
    rejected: Optional[dict] = None


class ActiveView(BaseModel):
    name: Optional[str] = None
    sha256: Optional[str] = None
    generation: int
    consistent: bool
    schedulers: list[SchedulerView]


class ActivationResult(BaseModel):
    active: str
    generation: int
    previous: Optional[str] = None
    applies: str
    schedulers: list[SchedulerView]
    flushed_cache: bool


class HistoryEntry(BaseModel):
    time: float
    generation: int
    name: str
    sha256: str
    previous: Optional[str] = None
    client: str


class HistoryView(BaseModel):
    history: list[HistoryEntry]


def _errors(*codes: int) -> dict:
    return {c: {"model": ErrorBody} for c in (401, *codes)}


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


async def _read_capped(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"profile is larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"profile is larger than {limit} bytes")
    return bytes(body)


def _parse_profile_body(raw: bytes, content_type: str):
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise HTTPException(415, "send the profile as Content-Type: application/json")
    if not raw.strip():
        raise HTTPException(400, "empty body: send the profile JSON")
    try:
        return json.loads(raw.decode("utf-8"))  # parsed, never evaluated
    except UnicodeDecodeError as e:
        raise HTTPException(400, f"profile is not UTF-8 text: {e}") from e
    except (ValueError, RecursionError) as e:
        raise HTTPException(400, f"profile is not valid JSON: {e}") from e


def create_app(settings: SidecarSettings, sidecar: Optional[Sidecar] = None) -> FastAPI:
    side = sidecar or Sidecar(settings)
    auth = [Depends(require_token(settings.token))]
    app = FastAPI(
        title="sglang-kascade admin sidecar", version=__version__,
        description="List, upload and hot-swap Kascade anchor profiles of a running SGLang "
                    "server; Prometheus metrics. Bearer token required except on /health.",
    )
    app.state.sidecar = side

    @app.exception_handler(StoreError)
    async def store_error(_request, exc: StoreError):
        return JSONResponse(status_code=exc.status, content={"detail": exc.message})

    @app.get("/health", response_model=Health)
    async def health():
        return {"status": "ok", "schedulers": len(side.schedulers())}

    @app.get("/v1/profiles", response_model=ProfileList, dependencies=auth,
             responses=_errors())
    async def list_profiles():
        return {"profiles": side.summaries()}

    @app.get("/v1/profiles/{name}", dependencies=auth, responses=_errors(404, 422),
             response_model=dict)
    async def show_profile(name: str):
        return side.store.get(name).data

    @app.post("/v1/profiles", status_code=201, response_model=UploadResult, dependencies=auth,
              responses={200: {"model": UploadResult, "description": "identical profile exists"},
                         **_errors(400, 409, 413, 415, 422, 503)},
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": PROFILE_JSON_SCHEMA}}}})
    async def upload_profile(request: Request, replace: bool = False):
        raw = await _read_capped(request, settings.max_upload_bytes)
        data = _parse_profile_body(raw, request.headers.get("content-type", ""))
        stored, created = side.upload(data, replace, _client(request))
        body = {"name": stored.name, "sha256": stored.sha256, "created": created}
        return JSONResponse(status_code=201 if created else 200, content=body)

    @app.post("/v1/profiles/{name}/activate", response_model=ActivationResult,
              dependencies=auth, responses=_errors(404, 409, 422, 503, 504))
    async def activate_profile(request: Request, name: str,
                               flush_cache: bool = Query(False, description=(
                                   "also empty SGLang's radix cache, so cached prefixes are "
                                   "recomputed under the new profile"))):
        return await side.activate(name, flush_cache, _client(request))

    @app.get("/v1/active", response_model=ActiveView, dependencies=auth, responses=_errors())
    async def active():
        return side.active()

    @app.get("/v1/history", response_model=HistoryView, dependencies=auth, responses=_errors())
    async def history():
        return {"history": side.history()}

    @app.get("/metrics", dependencies=auth, responses=_errors(),
             response_class=Response,
             openapi_extra={"responses": {"200": {"content": {"text/plain": {}}}}})
    async def prometheus_metrics():
        return Response(metrics.render(side.metrics_view),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
