"""The FastAPI application: routes, the error shape, body limits, API key, CORS and request metrics.

``create_app(settings, detectors=None)`` builds an app; ``detectors`` (name -> detector object) bypasses loading
from ``settings.models`` (tests, embedding). ``app`` at module level is what ``uvicorn api.app:app`` serves,
configured from the environment.

Decisions:

* Every error, ours (:class:`detect.errors.DetectError`), FastAPI's validation errors, Starlette's 404/405 and
  any unexpected exception, leaves as ``{"error": {"code", "message"}}``. Unexpected exceptions are logged
  server-side with their traceback and answer a bare ``internal_error``.
* The body limit is enforced by an ASGI wrapper around ``receive`` that counts the bytes as they arrive, so a
  chunked upload or a lying ``Content-Length`` is stopped at the limit (413); a declared ``Content-Length``
  above it is refused before reading anything.
* ``POST /detect`` takes ``multipart/form-data`` (files, plus parameters as form fields; ``classes`` repeated or
  comma-separated) or ``application/json`` (:class:`api.schemas.DetectJSONRequest`, base64 images). Anything
  else is 415.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.schemas import DetectJSONRequest, DetectParams, DetectResponse, ErrorResponse, Health, ImageIn, ModelsResponse
from api.service import DetectionService
from api.settings import Settings
from detect import __version__
from detect.errors import DetectError, NotReadyError, PayloadTooLargeError, UnauthorizedError, UnsupportedMediaTypeError

log = logging.getLogger("detect.api")

_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type"}
_KNOWN_PATHS = frozenset({"/detect", "/models", "/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"})
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 415, 422, 503, 504)
}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


class BodyLimitMiddleware:
    """413 for bodies above ``limit`` bytes, counted while they stream in (see the module docstring)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > self.limit:
            return await self._refuse()(scope, receive, send)
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise PayloadTooLargeError(f"the request body is larger than {self.limit} bytes")
            return message

        await self.app(scope, counted, send)

    def _refuse(self) -> JSONResponse:
        return error_response(413, PayloadTooLargeError.code, f"the request body is larger than {self.limit} bytes")


class MetricsMiddleware:
    """Counts requests by path and status, and times them (``/metrics`` itself included)."""

    def __init__(self, app: ASGIApp, service: DetectionService) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status, start = 500, time.perf_counter()

        async def recorded(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.service.metrics.request_started()
        try:
            await self.app(scope, receive, recorded)
        finally:
            path = scope["path"] if scope["path"] in _KNOWN_PATHS else "other"
            self.service.metrics.request_finished(path, status, time.perf_counter() - start)


def create_app(settings: Settings | None = None, detectors: dict[str, Any] | None = None) -> FastAPI:
    settings = settings or Settings()
    service = DetectionService(settings, detectors)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        yield
        await service.stop()

    app = FastAPI(title="detect", version=__version__, lifespan=lifespan, responses=_ERROR_RESPONSES)
    app.state.service = service
    _add_error_handlers(app)
    _add_routes(app, service, settings)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"], allow_headers=["*"])
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, service=service)
    _document_detect_body(app)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DetectError)
    async def detect_error(request: Request, err: DetectError) -> JSONResponse:
        retry = err.details.get("retry_after")
        return error_response(err.http_status, err.code, err.message, {"Retry-After": str(retry)} if retry is not None else None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_request", _describe(err.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return error_response(err.status_code, _HTTP_CODES.get(err.status_code, "http_error"), str(err.detail), err.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal server error")


def _describe(errors: Sequence[dict]) -> str:
    """``field.path: message; ...`` for the first few validation errors (never the input values)."""
    parts = [f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg', 'invalid')}" for e in errors[:5]]
    return "; ".join(parts) or "invalid request"


def _add_routes(app: FastAPI, service: DetectionService, settings: Settings) -> None:
    def require_api_key(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("x-api-key", "")
        if not hmac.compare_digest(given.encode(), settings.api_key.get_secret_value().encode()):
            raise UnauthorizedError("a valid X-API-Key header is required")

    @app.get("/healthz", response_model=Health, tags=["probes"])
    async def healthz() -> dict:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=Health, tags=["probes"])
    async def readyz() -> dict:
        """503 until every model is loaded and warmed up."""
        if not service.ready:
            raise NotReadyError(f"not ready: {service.not_ready_reason}", retry_after=settings.retry_after_s)
        return {"status": "ready"}

    @app.get("/metrics", response_class=PlainTextResponse, tags=["probes"])
    async def metrics() -> PlainTextResponse:
        """Prometheus text format."""
        return PlainTextResponse(service.metrics.render(service.queue_depth()), media_type="text/plain; version=0.0.4")

    @app.get("/models", response_model=ModelsResponse, dependencies=[Depends(require_api_key)])
    async def models() -> dict:
        """The loaded detectors, their classes and device."""
        return {
            "default": service.default_model,
            "models": [
                {
                    "name": m.name,
                    "detector": str(getattr(m.detector, "name", type(m.detector).__name__)),
                    "version": m.version,
                    "class_names": list(m.detector.class_names),
                    "proposals": list(m.proposals),
                    "device": settings.device,
                }
                for m in service.models.values()
            ],
        }

    @app.post("/detect", response_model=DetectResponse, dependencies=[Depends(require_api_key)], name="detect")
    async def detect(request: Request) -> dict:
        """Detect objects in one or several images (multipart files, or JSON with base64 data)."""
        params, sources = await _read_detect_request(request, settings)
        return await service.detect(params, sources)


async def _read_detect_request(request: Request, settings: Settings) -> tuple[DetectParams, list[tuple[str | None, bytes | str]]]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        try:
            body = DetectJSONRequest.model_validate_json(await request.body())
        except ValidationError as err:
            raise RequestValidationError(err.errors(include_input=False)) from None
        params = DetectParams.model_validate(body.model_dump(exclude={"images"}))
        return params, [(image.id, image.data) for image in body.images]
    if content_type == "multipart/form-data":
        limit = settings.max_images_per_request
        form = await request.form(max_files=limit + 1, max_fields=64)
        files = [(v.filename, await v.read()) for _, v in form.multi_items() if isinstance(v, UploadFile)]
        fields: dict[str, Any] = {}
        for key, value in form.multi_items():
            if isinstance(value, str):
                if key == "classes":
                    fields.setdefault("classes", []).extend(c for c in value.split(",") if c.strip())
                else:
                    fields[key] = value
        try:
            params = DetectParams.model_validate(fields)
        except ValidationError as err:
            raise RequestValidationError(err.errors(include_input=False)) from None
        if not files:
            raise RequestValidationError([{"loc": ("images",), "msg": "no image file in the form", "type": "missing"}])
        return params, files
    raise UnsupportedMediaTypeError(
        f"content type {content_type or 'none'!r}: send multipart/form-data or application/json"
    )


def _document_detect_body(app: FastAPI) -> None:
    """Describe ``POST /detect``'s two body types in the OpenAPI document (the route reads the raw request)."""
    default_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = default_openapi()
        ref = "#/components/schemas/{model}"
        json_schema = DetectJSONRequest.model_json_schema(ref_template=ref)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(json_schema.pop("$defs", {}))
        components["DetectJSONRequest"] = json_schema
        components["ImageIn"] = ImageIn.model_json_schema(ref_template=ref)
        form = DetectParams.model_json_schema(ref_template=ref)
        form["properties"]["images"] = {"type": "array", "items": {"type": "string", "format": "binary"}}
        schema["paths"]["/detect"]["post"]["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": ref.format(model="DetectJSONRequest")}},
                "multipart/form-data": {"schema": form},
            },
        }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def __getattr__(name: str) -> Any:
    """``api.app:app`` is built on first access, so importing this module reads no environment."""
    if name == "app":
        globals()["app"] = built = create_app()
        return built
    raise AttributeError(name)
