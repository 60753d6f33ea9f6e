"""FastAPI routes of the admin sidecar (OpenAPI at /openapi.json, docs at /docs).

Every route but /health and the API description (/openapi.json, /docs, /redoc: the schema only,
no token, path or profile content in them) needs ``Authorization: Bearer <token>``. Changes
(upload, delete, activate) are audited. The operations themselves live in sidecar.py; this file
only maps HTTP onto them. Routes doing file I/O or validation run it in worker threads, so the
event loop (and /health) never waits for a listing or a large upload.
"""

from __future__ import annotations

import asyncio
import json
import math
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
    name: Optional[str] = None
    sha256: str
    previous: Optional[str] = None
    client: str
    note: Optional[str] = None  # set on an entry recorded by reconciliation (sidecar.py)


class HistoryView(BaseModel):
    history: list[HistoryEntry]


def _errors(*codes: int) -> dict:
    return {c: {"model": ErrorBody} for c in (401, *codes)}


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


async def _read_capped(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() \
            and int(declared) > limit:
        raise HTTPException(413, f"profile is larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"profile is larger than {limit} bytes")
    return bytes(body)


MAX_JSON_DEPTH = 32  # nesting of an uploaded profile (shipped ones: 5)


def _field(path: str) -> str:
    return f"profile field {path!r}" if path else "profile"


def _check_round_trip(value, path: str = "", depth: int = 1) -> None:
    """Refuse (422, naming the field) what could be stored but not given back identically:
    NaN, Infinity and numbers overflowing a double (JSON has no such values: they would come
    back as null), strings that are not Unicode text (a lone surrogate such as "\\ud800"
    cannot be encoded as UTF-8), and nesting deeper than MAX_JSON_DEPTH (the response encoder
    recurses)."""
    if depth > MAX_JSON_DEPTH:
        raise HTTPException(422, f"{_field(path)} nests deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, float) and not math.isfinite(value):
        raise HTTPException(422, f"{_field(path)}: {value!r} is not a JSON number (NaN, Infinity "
                                 "or beyond the range of a double)")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise HTTPException(422, f"{_field(path)}: a string holds a lone surrogate (at "
                                     f"character {e.start}); not Unicode text") from e
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_round_trip(k, path, depth)
            _check_round_trip(v, f"{path}.{k}" if path else str(k), depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_round_trip(v, f"{path}[{i}]", depth + 1)


def _parse_profile_body(raw: bytes, content_type: str):
    """The uploaded JSON, parsed (never evaluated) and checked to read back identically through
    GET (_check_round_trip)."""
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise HTTPException(415, "send the profile as Content-Type: application/json")
    if not raw.strip():
        raise HTTPException(400, "empty body: send the profile JSON")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise HTTPException(400, f"profile is not UTF-8 text: {e}") from e
    except (ValueError, RecursionError) as e:
        raise HTTPException(400, f"profile is not valid JSON: {e}") from e
    _check_round_trip(data)
    return data


def create_app(settings: SidecarSettings, sidecar: Optional[Sidecar] = None) -> FastAPI:
    side = sidecar or Sidecar(settings)
    auth = [Depends(require_token(settings.token))]
    app = FastAPI(
        title="sglang-kascade admin sidecar", version=__version__,
        description="List, upload and hot-swap Kascade anchor profiles of a running SGLang "
                    "server; Prometheus metrics. Bearer token required except on /health and "
                    "this API description (/openapi.json, /docs, /redoc), which hold no "
                    "secrets.",
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
        return {"profiles": await asyncio.to_thread(side.summaries)}

    @app.get("/v1/profiles/{name}", dependencies=auth, responses=_errors(404, 422),
             response_model=dict)
    async def show_profile(name: str):
        return (await asyncio.to_thread(side.store.get, name)).data

    @app.delete("/v1/profiles/{name}", status_code=204, dependencies=auth,
                responses=_errors(404, 409, 503), response_class=Response)
    async def delete_profile(request: Request, name: str):
        await side.delete(name, _client(request))
        return Response(status_code=204)

    @app.post("/v1/profiles", status_code=201, response_model=UploadResult, dependencies=auth,
              responses={200: {"model": UploadResult, "description": "identical profile exists"},
                         **_errors(400, 409, 413, 415, 422, 503)},
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": PROFILE_JSON_SCHEMA}}}})
    async def upload_profile(request: Request, replace: bool = False):
        raw = await _read_capped(request, settings.max_upload_bytes)
        data = await asyncio.to_thread(_parse_profile_body, raw,
                                       request.headers.get("content-type", ""))
        stored, created = await side.upload(data, replace, _client(request))
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

    @app.get("/v1/history", response_model=HistoryView, dependencies=auth,
             responses=_errors(503))
    async def history():
        return {"history": side.history_reconciled()}

    @app.get("/metrics", dependencies=auth, responses=_errors(),
             response_class=Response,
             openapi_extra={"responses": {"200": {"content": {"text/plain": {}}}}})
    async def prometheus_metrics():
        return Response(metrics.render(side.metrics_view),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
